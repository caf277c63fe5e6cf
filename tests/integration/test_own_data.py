"""A user's own folder end to end: mixed image sizes, EXIF orientation, tags without masks, held-out val."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from wsss.cli import main
from wsss.config import ConfigError, load_config
from wsss.data.check import check_root
from wsss.data.classes import ClassSpec, voc_palette
from wsss.data.datasets.folder import held_out
from wsss.data.io import DataError, image_size, read_image, read_mask, write_mask
from wsss.data.loader import SizeBatchSampler
from wsss.evaluation.evaluators import TagEvaluator, format_table, headline

TINY = ["--model.backbone", "test_vit", "--model.weights", "none", "--model.seg_hidden", "16",
        "--model.drop_path", "0", "--data.crop_size", "48", "--data.num_workers", "0", "--train.batch_size", "2",
        "--train.max_iters", "2", "--optim.warmup_iters", "1", "--method.seg_warmup", "1"]  # fmt: skip
PALETTE = voc_palette().flatten().tolist()


def _exif(orientation: int) -> Image.Exif:
    ex = Image.Exif()
    ex[0x0112] = orientation
    return ex


def test_exif_orientation_is_applied_to_images_masks_and_sizes(tmp_path):
    """Orientation 6 (turn 90 degrees clockwise to display): the stored top-left pixel is shown top-right."""
    a = np.zeros((12, 30, 3), np.uint8)
    a[0, 0] = (255, 0, 0)
    Image.fromarray(a).save(tmp_path / "p.png", exif=_exif(6))
    img = read_image(tmp_path / "p.png")
    assert img.shape == (30, 12, 3) and np.argwhere(img[..., 0] == 255).tolist() == [[0, 11]]
    assert image_size(tmp_path / "p.png") == (30, 12)
    stored = (np.arange(12 * 30).reshape(12, 30) % 7).astype(np.uint8)
    m = Image.fromarray(stored, mode="P")
    m.putpalette(PALETTE)
    m.save(tmp_path / "m.png", exif=_exif(6))
    assert np.array_equal(read_mask(tmp_path / "m.png", (30, 12)), np.rot90(stored, -1))
    Image.fromarray(a).save(tmp_path / "q.png", exif=_exif(3))  # 180 degrees: same size, bottom-right
    assert np.argwhere(read_image(tmp_path / "q.png")[..., 0] == 255).tolist() == [[11, 29]]
    with pytest.raises(DataError, match=r"m.png: mask is 30x12 but its image is 12x30"):
        read_mask(tmp_path / "m.png", (12, 30))


def test_data_check_reports_the_displayed_size(tmp_path):
    root = tmp_path / "f"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    Image.new("RGB", (30, 12)).save(root / "images" / "a.png", exif=_exif(8))
    Image.new("RGB", (30, 12)).save(root / "images" / "b.png", exif=_exif(6))
    write_mask(root / "masks" / "a.png", np.zeros((30, 12), np.uint8), PALETTE)  # drawn on the displayed photo
    write_mask(root / "masks" / "b.png", np.zeros((12, 30), np.uint8), PALETTE)  # drawn on the stored pixels
    (root / "tags.csv").write_text("image,tags\na.png,dog\nb.png,dog\n")
    msgs = sorted(m for _, m in check_root(root))
    assert any(m.endswith("a.png: EXIF orientation 8: used as displayed, 30x12 (height x width)") for m in msgs)
    assert any("b.png: mask is 12x30 but its image is 30x12" in m for m in msgs)
    assert not any("a.png: mask" in m for m in msgs)


def test_size_batches_never_mix_sizes_and_keep_each_shard():
    sizes = [(2, 3), (3, 2), (2, 3), (2, 3), (3, 2), (2, 3)]
    assert list(SizeBatchSampler(sizes, 2)) == [[0, 2], [3, 5], [1, 4]]
    assert list(SizeBatchSampler(sizes, 2, rank=1, world=2)) == [[1], [3, 5]]  # shard 1, 3, 5
    assert list(SizeBatchSampler([(4, 4)] * 5, 2)) == [[0, 1], [2, 3], [4]]  # one size: the plain batches


def test_tag_evaluator_hand_computed():
    """Class a: scores 0.9 (tagged), 0.8, 0.3 (tagged): AP = 1 * 1/2 + 2/3 * 1/2; at 0.5 one true and one false
    positive, one miss: F1 = 2 / 4. Class b: never tagged, one score over 0.5: AP NaN, F1 0."""
    ev = TagEvaluator(ClassSpec(("a", "b")))
    ev.process({"tags": torch.tensor([[1, 0], [0, 0]])}, {"tags": torch.tensor([[0.9, 0.6], [0.8, 0.1]])})
    ev.process({"tags": torch.tensor([[1, 0]])}, {"tags": torch.tensor([[0.3, 0.2]])})
    r = ev.compute()
    assert r["ap"][0] == pytest.approx(5 / 6) and np.isnan(r["ap"][1]) and r["map"] == pytest.approx(5 / 6)
    assert r["f1_per_class"] == pytest.approx([0.5, 0.0]) and r["f1"] == pytest.approx(0.25)
    assert r["images"] == 3 and headline({"tags": r}) == {"tags_map": r["map"], "tags_f1": r["f1"]}
    tied = TagEvaluator(ClassSpec(("a",)))  # one bin: the tie counts as one threshold, AP = precision 1/2
    tied.process({"tags": torch.tensor([[1], [0]])}, {"tags": torch.tensor([[0.7], [0.7]])})
    assert tied.compute()["ap"] == pytest.approx([0.5])
    assert "mAP 83.33" in format_table({"tags": r}, ClassSpec(("a", "b")))


def test_held_out_share_is_stable_and_never_everything():
    names = [f"img{i:03d}" for i in range(40)]
    held = held_out(names, 0.1)
    assert len(held) == 4 and held == held_out(list(reversed(names)), 0.1)
    assert len(held_out(["a", "b"], 0.1)) == 1 and held_out(["a"], 0.5) == set() and held_out(names, 0) == set()
    assert len(held_out(["a", "b"], 0.9)) == 1
    with pytest.raises(ConfigError, match=r"data.folder.holdout' must be in \[0, 1\)"):
        load_config(None, ["--data.dataset", "folder", "--data.folder.holdout", "1"])


def _photos(root, sizes, masks: bool, exif_last: bool = False):
    """Images of ``sizes`` (H, W) with tags; a square of class 'dog' (index 2) or 'cat' (1) on each."""
    (root / "images").mkdir(parents=True)
    rows = []
    for i, (h, w) in enumerate(sizes):
        a = np.full((h, w, 3), 90, np.uint8)
        lab = np.zeros((h, w), np.uint8)
        cls = 1 + i % 2
        a[h // 4 : h // 2, w // 4 : w // 2] = (200, 40, 40) if cls == 1 else (40, 200, 40)
        lab[h // 4 : h // 2, w // 4 : w // 2] = cls
        name = f"p{i}.jpg"
        if exif_last and i == len(sizes) - 1:  # stored landscape, shown portrait: the mask follows the display
            Image.fromarray(np.ascontiguousarray(np.rot90(a))).save(root / "images" / name, exif=_exif(6))
        else:
            Image.fromarray(a).save(root / "images" / name)
        if masks:
            write_mask(root / "masks" / f"p{i}.png", lab, PALETTE)
        rows.append(f"{name},{'cat' if cls == 1 else 'dog'}\n")
    (root / "tags.csv").write_text("image,tags\n" + "".join(rows))
    (root / "classes.txt").write_text("cat\ndog\n")
    return root


SIZES = [(48, 48), (40, 64), (64, 40), (48, 48), (56, 72), (40, 64), (33, 50), (64, 40)]


def test_mixed_sizes_train_and_evaluate_in_batches(tmp_path, capsys):
    """The README's own-data command with images of many sizes and orientations and eval batches of 8."""
    tr = _photos(tmp_path / "tr", SIZES[:6], masks=False)
    va = _photos(tmp_path / "va", SIZES, masks=True, exif_last=True)
    run = tmp_path / "run"
    rc = main(["train", "--config", "configs/bench/toco.yaml", "--data.dataset", "folder", "--data.train_root",
               str(tr), "--data.val_root", str(va), "--eval.batch_size", "8", "--run-dir", str(run),
               *TINY])  # fmt: skip
    assert rc == 0
    final = json.loads((run / "final_eval.json").read_text())
    assert set(final) == {"seg", "cam", "pseudo"}
    assert main(["evaluate", str(run), "--eval.batch_size", "8"]) == 0
    rep = json.loads((run / "eval_val.json").read_text())
    assert rep["images"] == 8 and rep["results"]["seg"]["miou"] == pytest.approx(final["seg"]["miou"])
    one = tmp_path / "one.json"
    assert main(["evaluate", str(run), "--eval.batch_size", "1", "--out", str(one)]) == 0
    by_one = json.loads(one.read_text())["results"]
    assert by_one["seg"]["iou"] == pytest.approx(rep["results"]["seg"]["iou"], abs=1e-3)  # batching changes nothing


def test_tags_only_folder_trains_by_default_and_scores_held_out_tags(tmp_path, capsys):
    root = _photos(tmp_path / "f", [(48, 48), (40, 64), (64, 40), (56, 40)] * 5, masks=False)
    run = tmp_path / "run"
    rc = main(["train", "--config", "configs/bench/toco.yaml", "--data.dataset", "folder", "--data.root", str(root),
               "--run-dir", str(run), "--eval.batch_size", "4", *TINY])  # fmt: skip
    assert rc == 0
    final = json.loads((run / "final_eval.json").read_text())
    assert list(final) == ["tags"] and final["tags"]["images"] == 2  # 10 % of 20 held out, scored on their tags
    assert 0 <= final["tags"]["map"] <= 1
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["tags_map"] for r in recs if "tags_map" in r] == [final["tags"]["map"]]
    from wsss.build import build_dataset

    cfg = load_config(None, ["--data.dataset", "folder", "--data.root", str(root)])
    train = {it.name for it in build_dataset(cfg, cfg.data.train_split, train=True, load_masks=False).items}
    val = {it.name for it in build_dataset(cfg, cfg.data.val_split, train=False, load_masks=False).items}
    assert len(train) == 18 and not train & val and len(val) == 2
    assert main(["evaluate", str(run)]) == 0
    assert "tag level (2 images, no masks)" in capsys.readouterr().out
    # the report of a run without masks: tag AP bars, no confusion matrix, a grid without ground truth
    assert main(["report", str(run), "--samples", "2"]) == 0
    page = (run / "report" / "index.html").read_text()
    assert "confusion.png" not in page and "Per-class AP" in page and "image | CAM | pseudo label | prediction" in page
    assert not (run / "report" / "confusion.png").exists()
    assert f"{100 * final['tags']['map']:.2f}" in page


def test_some_masks_missing_is_one_line_naming_an_image(tmp_path, capsys):
    root = _photos(tmp_path / "f", [(48, 48)] * 10, masks=True)
    (root / "masks" / "p3.png").unlink()
    (root / "val.txt").write_text("p2.jpg\np3.jpg\n")
    rc = main(["train", "--config", "configs/bench/toco.yaml", "--data.dataset", "folder", "--data.root", str(root),
               "--run-dir", str(tmp_path / "run"), *TINY])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith("wsss: error: ")
    assert "p3.jpg: no mask for this image (1 of the 2 images of split 'val' lack one)" in err[-1]
