"""The Python API (``wsss.load``) and ``wsss predict``'s outputs: overlays, probabilities, CAMs, the
index of classes found, large images, and never replacing a file it did not write."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import wsss
from wsss.cli import main


@pytest.fixture(scope="module")
def run(tiny_toco_run):
    return tiny_toco_run


def test_every_input_type_gives_the_same_prediction_as_wsss_predict(run, demo_root, tmp_path):
    img = sorted((demo_root / "JPEGImages").glob("*.jpg"))[0]
    model = wsss.load(run, device="cpu")
    rgb = np.array(Image.open(img).convert("RGB"))
    preds = [model.predict(x) for x in (img, str(img), Image.open(img), rgb, torch.from_numpy(rgb).permute(2, 0, 1),
                                        torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255)]  # fmt: skip
    for p in preds[1:]:
        assert np.array_equal(p.mask, preds[0].mask)
        np.testing.assert_allclose(p.probs, preds[0].probs, atol=1e-5)
    p = preds[0]
    assert model.classes == ("background", "boat", "car", "cat", "flower", "person") == p.classes
    assert p.mask.shape == rgb.shape[:2] and p.probs.shape == (6, *rgb.shape[:2])
    np.testing.assert_allclose(p.probs.sum(0), 1.0, atol=1e-5)
    assert np.array_equal(p.mask, p.probs.argmax(0))
    counts = np.bincount(p.mask.ravel(), minlength=6)
    order = np.argsort(-counts, kind="stable")
    assert p.shares == {model.classes[k]: counts[k] / p.mask.size for k in order if counts[k]}
    out = tmp_path / "o"
    assert main(["predict", str(run), str(img), "--out", str(out), "--save-probs", "--save-cams"]) == 0
    assert np.array_equal(np.asarray(Image.open(out / f"{img.stem}.png")), p.mask)
    # the CLI reads through the dataset pipeline: equal probabilities and CAMs mean equal input normalisation
    np.testing.assert_allclose(np.load(out / f"{img.stem}_probs.npy").astype(np.float32), p.probs, atol=2e-3)
    cams = model.cams(img)
    assert cams.shape == (5, *rgb.shape[:2])
    np.testing.assert_allclose(np.load(out / f"{img.stem}_cams.npy").astype(np.float32), cams, atol=2e-3)
    assert cams.std() > 1e-3  # not a constant map that any input would give
    assert set(model.tags(img)) == set(model.classes[1:])


def test_exif_rotated_pil_image_is_predicted_as_displayed(run, tmp_path):
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 72, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display: 40 x 72 stored, 72 x 40 shown
    im.save(tmp_path / "r.jpg", exif=exif)
    model = wsss.load(run, device="cpu")
    shown = np.rot90(np.asarray(Image.open(tmp_path / "r.jpg")), k=-1)  # stored pixels turned clockwise
    want = model.predict(shown).probs
    assert want.shape[1:] == (72, 40)
    for x in (Image.open(tmp_path / "r.jpg"), tmp_path / "r.jpg"):
        np.testing.assert_allclose(model.predict(x).probs, want, atol=1e-5)
    assert np.abs(model.predict(np.rot90(np.asarray(Image.open(tmp_path / "r.jpg")), k=1)).probs - want).max() > 1e-3


def test_bad_inputs_are_plain_errors(run):
    model = wsss.load(run, device="cpu")
    with pytest.raises(ValueError, match=r"shape \(4, 5\)|shape \(2, 4, 5\)"):
        model.predict(np.zeros((2, 4, 5), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.predict(torch.full((3, 8, 8), 3.0))
    with pytest.raises(TypeError, match="list"):
        model.predict([1, 2])
    with pytest.raises(FileNotFoundError, match="nope: no such run"):
        wsss.load(run.parent / "nope")


def test_summaries_fit_and_overlay_by_hand():
    from wsss.data.classes import ClassSpec
    from wsss.evaluation.inference import fit_max_side, summarize_mask
    from wsss.viz.overlay import SWATCH, blend, overlay_panel

    spec = ClassSpec(("a", "b"), background=True)
    found, shares = summarize_mask(np.array([[0, 1, 1], [2, 2, 2]], np.uint8), spec)
    assert found == ("b", "a") and shares == {"b": 0.5, "a": 2 / 6, "background": 1 / 6}
    assert fit_max_side(torch.zeros(1, 3, 100, 50), 40).shape == (1, 3, 40, 20)
    assert fit_max_side(torch.zeros(1, 3, 30, 20), 40).shape == (1, 3, 30, 20)
    assert fit_max_side(torch.zeros(1, 3, 300, 20), 0).shape == (1, 3, 300, 20)
    with pytest.raises(ValueError, match="max_side -1"):
        fit_max_side(torch.zeros(1, 3, 30, 20), -1)
    rgb = np.full((2, 3, 3), 100, np.uint8)
    mask = np.array([[0, 1, 1], [2, 2, 2]], np.uint8)
    pal = (0, 0, 0, 128, 0, 0, 0, 128, 0)
    assert blend(rgb, mask, pal)[0, 1].tolist() == [114, 50, 50]
    assert blend(rgb, mask, pal)[1, 0].tolist() == [50, 114, 50]
    panel = overlay_panel(rgb, mask, shares, spec.seg_names, pal)
    assert panel.shape == (2 + 3 * SWATCH + 4, 6, 3)
    assert panel[:2, :3].tolist() == rgb.tolist() and panel[:2, 3:].tolist() == blend(rgb, mask, pal).tolist()
    assert panel[2 + 2 + 3, 2 + 3].tolist() == [0, 128, 0]  # first legend row: "b", the largest share


def test_predict_writes_overlays_probs_cams_and_an_index(run, demo_root, tmp_path):
    imgs = sorted((demo_root / "JPEGImages").glob("*.jpg"))[:2]
    out = tmp_path / "o"
    old = os.umask(0o002)
    try:
        rc = main(["predict", str(run), *map(str, imgs), "--out", str(out), "--overlay", "--save-probs",
                   "--save-cams", "--max-side", "32"])  # fmt: skip
    finally:
        os.umask(old)
    assert rc == 0
    index = json.loads((out / "predictions.json").read_text())
    assert index["classes"][0] == "background" and index["max_side"] == 32
    for f, rec in zip(imgs, index["images"]):
        mask = np.asarray(Image.open(out / f"{f.stem}.png"))
        assert mask.shape == (64, 64) == tuple(rec["size"])  # full size although predicted at 32 px
        probs, cams = np.load(out / f"{f.stem}_probs.npy"), np.load(out / f"{f.stem}_cams.npy")
        assert probs.dtype == np.float16 and probs.shape == (6, 64, 64) and cams.shape == (5, 64, 64)
        assert (probs.astype(np.float32).argmax(0) == mask).mean() > 0.99  # float16 ties aside
        counts = np.bincount(mask.ravel(), minlength=6)
        assert rec["shares"] == {index["classes"][k]: counts[k] / mask.size for k in np.argsort(-counts, kind="stable")
                                 if counts[k]}  # fmt: skip
        assert rec["found"] == [n for n in rec["shares"] if n != "background"]
        with Image.open(out / f"{f.stem}_overlay.png") as ov:
            assert ov.size[0] == 128 and ov.size[1] > 64
        assert (out / f"{f.stem}.png").stat().st_mode & 0o777 == 0o664


def test_predict_never_replaces_an_input_or_a_file_it_did_not_write(run, demo_root, tmp_path, capsys):
    src = sorted((demo_root / "JPEGImages").glob("*.jpg"))[0]
    folder = tmp_path / "mine"
    folder.mkdir()
    png = folder / "a.png"
    Image.open(src).save(png)
    before = png.read_bytes()
    assert main(["predict", str(run), str(png), "--out", str(folder)]) == 1
    assert f"{png}: is an input image" in capsys.readouterr().err
    out = tmp_path / "o"
    assert main(["predict", str(run), str(png), "--out", str(out)]) == 0
    assert main(["predict", str(run), str(png), "--out", str(out)]) == 1  # a second run into the same folder
    assert "a.png: exists and would be replaced (give --overwrite" in capsys.readouterr().err
    assert main(["predict", str(run), str(png), "--out", str(out), "--overwrite"]) == 0  # its own earlier files
    (out / "b.png").write_bytes(b"user's")
    b = folder / "b.png"
    Image.open(src).save(b)
    assert main(["predict", str(run), str(b), "--out", str(out), "--overwrite"]) == 1
    assert "not in this folder's predictions.json" in capsys.readouterr().err
    assert (out / "b.png").read_bytes() == b"user's" and png.read_bytes() == before
    (out / "b.png").unlink()
    (out / "b.png").symlink_to(tmp_path / "gone.png")  # a dangling link the user made
    assert main(["predict", str(run), str(b), "--out", str(out), "--overwrite"]) == 1
    assert (out / "b.png").is_symlink()
    Image.open(src).save(folder / "a_overlay.png")  # its mask would be a's overlay
    assert main(["predict", str(run), str(folder), "--out", str(tmp_path / "o2"), "--overlay"]) == 1
    assert "a_overlay.png: written for both a and a_overlay" in capsys.readouterr().err


def test_readme_python_example_runs(run, demo_root, capsys):
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    code = re.search(r"## Python API.*?```python\n(.*?)```", readme, re.S).group(1)
    img = sorted((demo_root / "JPEGImages").glob("*.jpg"))[0]
    exec(code.replace('"runs/my_run"', repr(str(run))).replace('"photo.jpg"', repr(str(img))), {})
    pred = wsss.load(run).predict(img)
    assert capsys.readouterr().out == f"{pred.found} {pred.shares}\n"


def test_predict_sliding_feeds_the_network_training_sized_windows(run, tmp_path, monkeypatch):
    from wsss.evaluation import inference
    from wsss.methods.toco import ToCo

    crop = wsss.load(run).cfg.data.crop_size
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (crop * 2 + 5, crop * 3, 3), np.uint8)).save(
        tmp_path / "big.png")  # fmt: skip
    seen, predict_seg = [], ToCo.predict_seg
    monkeypatch.setattr(ToCo, "predict_seg", lambda self, x: seen.append(tuple(x.shape[-2:])) or predict_seg(self, x))
    assert main(["predict", str(run), str(tmp_path / "big.png"), "--out", str(tmp_path / "w"), "--sliding",
                 "--save-probs"]) == 0  # fmt: skip
    stride = round(crop * (1 - 1 / 3))
    n = len(inference.window_starts(crop * 2 + 5, crop, stride)) * len(inference.window_starts(crop * 3, crop, stride))
    assert seen and set(seen) == {(crop, crop)} and n > 6
    index = json.loads((tmp_path / "w" / "predictions.json").read_text())
    assert index["window"] == crop and index["images"][0]["size"] == [crop * 2 + 5, crop * 3]
    windowed = np.load(tmp_path / "w" / "big_probs.npy")
    seen.clear()
    assert main(["predict", str(run), str(tmp_path / "big.png"), "--out", str(tmp_path / "whole"), "--save-probs"]) == 0
    assert seen == [(crop * 2 + 5, crop * 3)]  # without --sliding the whole image in one forward
    assert windowed.shape == np.load(tmp_path / "whole" / "big_probs.npy").shape
    seen.clear()
    assert main(["predict", str(run), str(tmp_path / "big.png"), "--out", str(tmp_path / "w2"), "--sliding",
                 "--eval.window", "20"]) == 0  # fmt: skip
    assert set(seen) == {(20, 20)}
