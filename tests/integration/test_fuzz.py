"""Fuzz: random malformed images, masks, tag files and recipes fed to the readers and the CLI. Every case ends
in success or a one-line error (exit 1 for data, 2 for usage and config), never a traceback or a hang.

The examples are fixed (derandomized) so CI is reproducible; ``HYPOTHESIS_PROFILE=fuzz`` draws many fresh
ones: ``HYPOTHESIS_PROFILE=fuzz pytest tests/integration/test_fuzz.py``."""

import io
import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.conftest import TINY
from wsss.cli import main
from wsss.data.io import DataError, inspect_image, read_image, read_mask

QUIET = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
settings.register_profile("ci", max_examples=40, derandomize=True, database=None, deadline=None,
                          suppress_health_check=QUIET)  # fmt: skip
settings.register_profile("fuzz", max_examples=2000, deadline=None, suppress_health_check=QUIET)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

MODES = ("RGB", "L", "P", "RGBA", "LA", "1", "CMYK", "I;16", "I", "F")
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")


def _bomb(side: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)) +
            chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))  # fmt: skip


@st.composite
def image_bytes(draw, max_side: int = 24) -> bytes:
    """An image file as a user's folder may hold it: any mode, format, size and EXIF orientation, then maybe
    truncated, bit-flipped, replaced by random bytes or text, emptied, or a header that declares a bomb."""
    kind = draw(st.sampled_from(("image", "image", "image", "random", "text", "empty", "bomb")))
    if kind == "random":
        return draw(st.binary(min_size=1, max_size=300))
    if kind == "text":
        return draw(st.text(max_size=60)).encode()
    if kind == "empty":
        return b""
    if kind == "bomb":
        return _bomb(draw(st.sampled_from((15000, 20000, 65535))))
    mode, fmt = draw(st.sampled_from(MODES)), draw(st.sampled_from(FORMATS))
    h, w = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    seed = draw(st.integers(0, 2**16))
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(arr).convert(mode) if mode not in ("I;16", "I", "F") else Image.fromarray(arr[..., 0]).convert(
        mode)  # fmt: skip
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = draw(st.integers(0, 9))
    try:
        im.save(buf, fmt, exif=exif) if fmt in ("JPEG", "PNG", "WEBP", "TIFF") else im.save(buf, fmt)
    except (OSError, ValueError, KeyError, TypeError):  # the format cannot hold the mode: TIFF holds them all
        buf = io.BytesIO()
        im.save(buf, "TIFF")
    data = buf.getvalue()
    damage = draw(st.sampled_from(("none", "none", "truncate", "flip")))
    if damage == "truncate":
        data = data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    elif damage == "flip":
        pos = draw(st.integers(0, len(data) - 1))
        data = data[:pos] + bytes([data[pos] ^ draw(st.integers(1, 255))]) + data[pos + 1 :]
    return data


def _one_line_error(text: str) -> bool:
    errors = [ln for ln in text.splitlines() if ln.startswith("wsss: error:")]
    return len(errors) == 1 and "Traceback" not in text


# a bit-flipped 1x1 TIFF whose width tag lost its type: Pillow raises ValueError("Invalid dimensions")
TIFF_FLIPPED = bytes.fromhex(
    "49492a00080000000a000001050001000000010000000101040001000000010000000201030004000000860000000301030001"
    "000000010000000601030001000000050000001101040001000000"
    "8e0000001501030001000000040000001601040001000000010000001701040001000000040000001c01030001000000010000"
    "00000000000800080008000800a07d3d00"
)


@example(data=TIFF_FLIPPED, size=None)  # found by this test; was a ValueError traceback
@given(data=image_bytes(), size=st.none() | st.tuples(st.integers(1, 30), st.integers(1, 30)))
def test_image_and_mask_readers_return_or_raise_one_data_error(data, size):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.png"
        path.write_bytes(data)
        problem, shape = inspect_image(path)
        assert problem is None or (problem[0] in ("error", "warning") and "\n" not in problem[1])
        for read in (lambda: read_image(path), lambda: read_image(path, 8), lambda: read_mask(path, size)):
            try:
                out = read()
            except DataError as e:
                assert "\n" not in str(e) and str(path) in str(e)
            else:
                assert out.dtype == np.uint8 and out.ndim in (2, 3)
        if problem is not None and problem[0] == "error":
            with pytest.raises(DataError):
                read_image(path)  # what the check calls unusable, the reader refuses too


CELL = st.sampled_from(("dog", "Dog", "cat", "dog;cat", "", " ", "dog;;", "a,b", '"dog', "\u00e9l\u00e8ve", "\t"))


@st.composite
def tagged_folder(draw) -> dict[str, bytes]:
    """Files of a tagged folder (relative path -> bytes). Half are well-formed but for one or two damaged
    images or masks (so the loaders and training are reached); the other half are messy throughout: any header,
    BOM, encoding, repeated, conflicting, empty or ragged rows, and maybe a classes.txt."""
    messy = draw(st.booleans())
    n = draw(st.integers(1, 4) if messy else st.integers(4, 6))
    names = [f"im{i}.{draw(st.sampled_from(('jpg', 'png', 'JPG', 'bmp')))}" for i in range(n)]
    if messy:
        files = {f"images/{f}": draw(image_bytes(max_side=20)) for f in names}
        files |= {f"masks/{Path(f).stem}.png": draw(image_bytes(max_side=20)) for f in names if draw(st.booleans())}
    else:
        damaged = set(draw(st.lists(st.sampled_from(names), max_size=2)))
        files = {f"images/{f}": draw(image_bytes(max_side=20)) if f in damaged else _clean_image(draw(
            st.integers(8, 40)), draw(st.integers(8, 40)), i) for i, f in enumerate(names)}  # fmt: skip
    header = draw(st.sampled_from(("image,tags", "image,tags", "\ufeffimage,tags", "file,labels", "", "image")))
    listed = names + draw(st.lists(st.sampled_from(("missing.jpg", "../etc.jpg", "")), max_size=2))
    rows = [",".join([draw(st.sampled_from(listed)), draw(CELL)] + draw(st.lists(CELL, max_size=1)))
            for _ in range(draw(st.integers(0, 6)))]  # fmt: skip
    if not messy:
        header, rows = "image,tags", [f"{f},{draw(st.sampled_from(('dog', 'cat', 'dog;cat')))}" for f in names]
    text = "\n".join([header, *rows]) + draw(st.sampled_from(("\n", "", "\r\n", "\n\n")))
    files["tags.csv"] = text.encode(draw(st.sampled_from(("utf-8", "utf-8", "latin-1", "utf-16")) if messy else
                                    st.just("utf-8")), "replace")  # fmt: skip
    if messy and draw(st.booleans()):
        files["classes.txt"] = draw(st.sampled_from(("dog\ncat\n", "dog\n", "", "dog\ndog\n", "Dog\ndog\n"))).encode()
    return files


def _clean_image(h: int, w: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _write(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


@given(files=tagged_folder())
def test_data_check_on_a_malformed_folder_reports_instead_of_crashing(files, capsys):
    with tempfile.TemporaryDirectory() as d:
        _write(Path(d), files)
        capsys.readouterr()
        rc = main(["data", "check", d])
        out, err = capsys.readouterr()
        assert rc in (0, 1) and "Traceback" not in out + err
        assert out.splitlines()[-1].endswith(" warnings")
        lines = [ln for ln in out.splitlines()[:-1]]
        assert all(ln.split(":", 1)[0] in ("error", "warning", "info") for ln in lines), lines
        assert (rc == 1) == any(ln.startswith("error:") for ln in lines)


@pytest.mark.slow
@settings(max_examples=max(10, settings.default.max_examples // 20))
@given(files=tagged_folder())
def test_training_on_a_malformed_folder_ends_in_success_or_one_line(files, capsys):
    """The start-up pass and the loaders: a short training run on a fuzzed folder (its own val split)."""
    with tempfile.TemporaryDirectory() as d:
        _write(Path(d) / "data", files)
        capsys.readouterr()
        rc = main(["train", "--config", "configs/bench/toco.yaml", *TINY, "--data.dataset", "folder",
                   "--data.root", str(Path(d) / "data"), "--run-dir", str(Path(d) / "run"), "--train.max_iters", "1",
                   "--data.folder.holdout", "0.5", "--data.max_bad_images", "2"])  # fmt: skip
        _, err = capsys.readouterr()
        assert rc == 0 or (rc in (1, 2) and _one_line_error(err)), err


SECTIONS = ("model", "data", "train", "optim", "eval", "method", "bogus")
KEYS = ("backbone", "crop_size", "max_iters", "lr", "batch_size", "scales", "log_every", "amp", "device", "seed",
        "dataset", "bkg_thre", "w_ctc", "warmup_iters", "scale_range", "nope")  # fmt: skip
VALUES = st.one_of(st.integers(-3, 3), st.sampled_from((1e9, -1e-9, float("nan"), 0.5)), st.booleans(), st.none(),
                   st.sampled_from(("", "auto", "cuda", "x", "[1, 2]", "{a: 1}", "1e-3", "0x10")),
                   st.lists(st.integers(-1, 2), max_size=3))  # fmt: skip


@st.composite
def recipe(draw) -> tuple[str, list[str]]:
    """YAML text of a recipe (maybe not YAML, not a mapping, sections as scalars, a _base_ cycle) and CLI
    overrides with any key and value."""
    import yaml

    top = draw(st.dictionaries(st.sampled_from(SECTIONS), st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=3)
                               | VALUES, max_size=4))  # fmt: skip
    base = draw(st.sampled_from((None, "configs/bench/toco.yaml", "self", "missing.yaml")))
    if base:
        top["_base_"] = base
    text = draw(st.sampled_from(("yaml", "yaml", "yaml", "scalar", "broken", "latin1")))
    body = {"yaml": yaml.safe_dump(top), "scalar": "5\n", "broken": "model: [\n", "latin1": "model:\n  x: caf\xe9\n"}
    overrides = []
    for _ in range(draw(st.integers(0, 3))):
        key = f"--{draw(st.sampled_from(SECTIONS))}.{draw(st.sampled_from(KEYS))}"
        overrides += [key] + ([str(draw(VALUES))] if draw(st.booleans()) else [])
    return body[text], overrides


@example(spec=("_base_: configs/bench/toco.yaml\nmethod: 1\n", []))  # found by this test: AttributeError
@given(spec=recipe())
def test_any_recipe_and_overrides_resolve_or_fail_in_one_line(spec, capsys):
    text, overrides = spec
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "r.yaml"
        raw = text.replace("_base_: self", f"_base_: {path}").replace("configs/bench/", f"{Path.cwd()}/configs/bench/")
        path.write_bytes(raw.encode("latin-1" if "caf\xe9" in raw else "utf-8"))
        capsys.readouterr()
        try:
            rc = main(["train", "--config", str(path), "--print-config", *overrides])
        except SystemExit as e:  # argparse's own usage error (a flag without its value): usage text, exit 2
            rc = e.code
            assert rc == 2
            return
        _, err = capsys.readouterr()
        assert rc == 0 or (rc in (1, 2) and _one_line_error(err)), err
