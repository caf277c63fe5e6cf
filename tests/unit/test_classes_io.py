import os
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss.data.classes import VOC, ClassSpec, voc_palette
from wsss.data.io import DataError, inspect_image, read_image, read_mask, write_mask
from wsss.utils.files import atomic_write


def test_voc_palette_known_entries():
    pal = voc_palette()
    assert pal[0].tolist() == [0, 0, 0] and pal[1].tolist() == [128, 0, 0]
    assert pal[15].tolist() == [192, 128, 128] and pal[255].tolist() == [224, 224, 192]


def test_classspec_indices():
    assert (VOC.num_fg, VOC.K, VOC.fg_offset) == (20, 21, 1)
    nb = ClassSpec(("x", "y"), background=False)
    assert (nb.K, nb.fg_offset, nb.seg_names) == (2, 0, ("x", "y"))
    assert VOC.multi_hot(["cat", "person"]).nonzero()[0].tolist() == [7, 14]
    assert VOC.tags_from_mask(np.array([[0, 8], [255, 15]])) == ["cat", "person"]
    with pytest.raises(KeyError, match="unknown tag 'kat'"):
        VOC.index("kat")


def test_palette_mask_roundtrip_keeps_indices(tmp_path):
    m = np.array([[0, 15, 255], [3, 3, 20]], dtype=np.uint8)
    write_mask(tmp_path / "m.png", m, voc_palette().flatten().tolist())
    with Image.open(tmp_path / "m.png") as im:
        assert im.mode == "P"
        assert np.asarray(im.convert("L")).tolist() != m.tolist()  # the trap a luminance read falls into
    assert read_mask(tmp_path / "m.png").tolist() == m.tolist()
    with pytest.raises(DataError, match=r"m.png: mask is 2x3 but its image is 4x4"):
        read_mask(tmp_path / "m.png", (4, 4))


def test_image_problems_named(tmp_path):
    Image.new("RGBA", (4, 4)).save(tmp_path / "a.png")
    Image.new("L", (4, 4)).save(tmp_path / "g.png")
    Image.new("I;16", (4, 4)).save(tmp_path / "d.png")
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    assert inspect_image(tmp_path / "a.png")[0][0] == "warning"
    assert inspect_image(tmp_path / "g.png")[0][0] == "warning"
    assert inspect_image(tmp_path / "d.png")[0] == (
        "error",
        f"{tmp_path / 'd.png'}: I;16 (16/32-bit) image; convert it to 8-bit RGB",
    )
    assert inspect_image(tmp_path / "bad.jpg")[0][0] == "error"
    assert read_image(tmp_path / "g.png").shape == (4, 4, 3)
    with pytest.raises(DataError, match="16/32-bit"):
        read_image(tmp_path / "d.png")
    with pytest.raises(DataError, match="missing"):
        read_image(tmp_path / "nope.jpg")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_gives_the_mode_the_umask_says(tmp_path, umask, mode):
    # mkstemp's temporary file is 0600: written results were private whatever the user's umask
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "out.json", lambda p: Path(p).write_text("{}"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out.json").stat().st_mode) == mode
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary file left


def test_results_json_puts_each_number_list_on_one_line():
    import json
    import math

    from wsss.data.io import dumps_results

    conf = [[i * 81 + j for j in range(81)] for i in range(81)]
    res = {"seg": {"iou": [0.5, float("nan"), 1e-07, -2.0], "miou": 0.25, "confusion": conf}, "names": ["a", "b"],
           "note": "scales [1.0,0.5] kept as written"}  # fmt: skip
    text = dumps_results(res)
    back = json.loads(text)
    assert back["seg"]["confusion"] == conf and back["names"] == ["a", "b"] and back["note"] == res["note"]
    assert (
        back["seg"]["iou"][0] == 0.5 and math.isnan(back["seg"]["iou"][1]) and back["seg"]["iou"][2:] == [1e-07, -2.0]
    )
    assert len(text.splitlines()) < 81 + 20  # one line a matrix row (json.dumps(indent=2): 6,700 lines)
    assert '"iou": [0.5, NaN, 1e-07, -2.0]' in text


def test_a_programming_error_in_a_read_is_not_called_a_bad_file(tmp_path):
    """Only errors raised inside Pillow (or I/O errors) make an image 'corrupt': a TypeError from our own code
    is raised as it is, so training does not skip every image as unreadable."""
    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    with pytest.raises(TypeError):
        read_image(tmp_path / "a.png", max_side="8")
