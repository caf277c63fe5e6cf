"""data.max_side: huge photos are read downscaled (JPEG draft decoding), masks follow by nearest, and a run
trains, evaluates and exports pseudo labels at that size."""

import json

import numpy as np
import pytest
from PIL import Image

from tests.integration.test_own_data import PALETTE, TINY, _exif, _photos
from wsss.cli import main
from wsss.data.check import check_root
from wsss.data.io import DataError, fit_side, read_image, write_mask
from wsss.methods.toco import ToCo


def test_fit_side_hand_values():
    assert fit_side((6000, 4000), 1000) == (1000, 667) and fit_side((4000, 6000), 1000) == (667, 1000)
    assert fit_side((100, 50), 1000) == (100, 50) and fit_side((3, 5000), 1000) == (1, 1000)
    assert fit_side((6000, 4000), 0) == (6000, 4000)


def test_read_image_downscales_as_displayed_with_the_jpeg_draft(tmp_path):
    h, w = 600, 400  # stored landscape 400 x 600, EXIF 6: shown portrait 600 x 400
    shown = np.zeros((h, w, 3), np.uint8)
    shown[: h // 2] = (250, 20, 20)  # top half red, bottom half blue, as displayed
    shown[h // 2 :] = (20, 20, 250)
    Image.fromarray(np.ascontiguousarray(np.rot90(shown))).save(tmp_path / "r.jpg", exif=_exif(6), quality=95)
    full = read_image(tmp_path / "r.jpg")
    assert full.shape == (600, 400, 3) and full[5, 20, 0] > 200 and full[595, 20, 2] > 200
    small = read_image(tmp_path / "r.jpg", max_side=60)
    assert small.shape == (60, 40, 3)
    assert small[5, 20, 0] > 200 and small[5, 20, 2] < 60 and small[55, 20, 2] > 200 and small[55, 20, 0] < 60
    assert np.abs(small.astype(int) - np.asarray(Image.fromarray(full).resize((40, 60), Image.BILINEAR))).mean() < 3
    Image.fromarray(shown).save(tmp_path / "p.png")  # not a JPEG: plain resize, same result
    assert read_image(tmp_path / "p.png", max_side=60).shape == (60, 40, 3)


def test_max_side_run_trains_evaluates_and_exports_at_the_reduced_size(tmp_path, monkeypatch):
    root = _photos(tmp_path / "f", [(48, 48), (40, 64), (64, 40), (56, 40)] * 3 + [(300, 200)], masks=True)
    (root / "val.txt").write_text("p12.jpg\np1.jpg\n")  # the large image is in val
    assert any("large image" in m for _, m in check_root(root)) is False  # 300 px: not large
    seen, predict_seg = [], ToCo.predict_seg
    monkeypatch.setattr(ToCo, "predict_seg", lambda self, x: seen.append(tuple(x.shape[-2:])) or predict_seg(self, x))
    run = tmp_path / "run"
    assert main(["train", "--config", "configs/bench/toco.yaml", "--data.dataset", "folder", "--data.root", str(root),
                 "--run-dir", str(run), "--data.max_side", "60", *TINY]) == 0  # fmt: skip
    assert (90, 60) not in seen and (300, 200) not in seen and (60, 40) in seen  # the big image, read at 60 x 40
    final = json.loads((run / "final_eval.json").read_text())
    # scored at the read sizes: 300 x 200 -> 60 x 40 and 40 x 64 -> 38 x 60
    assert sum(map(sum, final["seg"]["confusion"])) == 60 * 40 + 38 * 60
    out = tmp_path / "pl"
    assert main(["pseudo-labels", str(run), "--split", "val", "--out", str(out)]) == 0
    assert np.asarray(Image.open(out / "p12.png")).shape == (60, 40)
    # a mask of neither the full nor the read size is an error naming both sizes
    write_mask(root / "masks" / "p12.png", np.zeros((10, 10), np.uint8), PALETTE)
    with pytest.raises(DataError, match=r"p12.png: mask is 10x10 but its image is 300x200"):
        from wsss.build import build_eval_dataset
        from wsss.config import load_config

        ds = build_eval_dataset(load_config(run / "config.yaml"), "val")
        ds[[it.name for it in ds.items].index("p12")]


def test_data_check_warns_about_large_images_and_names_the_knob(tmp_path, capsys):
    root = _photos(tmp_path / "f", [(48, 48), (2100, 40)], masks=False)
    msgs = [m for sev, m in check_root(root) if sev == "warning"]
    assert any("p1.jpg: large image (2100x40)" in m and "--data.max_side 2048" in m for m in msgs)
    assert not any("p0.jpg" in m for m in msgs)
    assert main(["train", "--config", "demo/toco", "--data.dataset", "folder", "--data.root", str(root),
                 "--data.max_side", "-1", "--run-dir", str(tmp_path / "r"), *TINY]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "wsss: error: data.max_side must be >= 0 (0: off), got -1"  # refused before any training
    assert not (tmp_path / "r").exists()  # not even config.yaml: the trainer never started


def test_training_evaluation_shows_progress_on_a_terminal(tmp_path, capsys, monkeypatch):
    import sys

    root = _photos(tmp_path / "f", [(48, 48), (40, 64)] * 5, masks=True)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["train", "--config", "demo/toco", "--data.dataset", "folder", "--data.root", str(root),
                 "--run-dir", str(tmp_path / "run"), *TINY]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "evaluate val:   0%|" in err and "0/1 [" in err  # the final evaluation's bar over the one held-out image
