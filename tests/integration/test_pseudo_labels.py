"""Pseudo-label export (``wsss pseudo-labels``), a second stage trained on it (``--data.mask_dir``), the
DeepLabV3 head, and the crash-safe output index shared with ``wsss predict``."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsss.cli import main


@pytest.fixture(scope="module")
def run(tiny_toco_run):
    return tiny_toco_run


@pytest.fixture(scope="module")
def labels(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("labels") / "train"
    assert main(["pseudo-labels", str(run), "--out", str(out)]) == 0
    return out


def test_exported_labels_equal_the_methods_pseudo_labels(run, labels):
    from wsss.api import load_run
    from wsss.build import build_dataset

    cfg, method, classes, device, _ = load_run(run)
    ds = build_dataset(cfg, cfg.data.train_split, train=False, load_masks=False)
    index = json.loads((labels / "pseudo_labels.json").read_text())
    assert index["classes"] == list(classes.seg_names) and index["split"] == "train" and index["crf"] == "none"
    assert index["method_config"]["cam_scales"] == list(cfg.method.cam_scales)
    assert [im["name"] for im in index["images"]] == [it.name for it in ds.items]
    n_ignored = 0
    for i in range(len(ds)):
        s = ds[i]
        want = method.pseudo_labels(s["image"][None], s["tags"][None], s["valid"][None])[0].numpy()
        png = Image.open(labels / f"{s['name']}.png")
        assert png.mode == "P"
        got = np.asarray(png)
        assert np.array_equal(got, want)
        assert index["images"][i]["labelled"] == pytest.approx((got != 255).mean(), abs=1e-6)
        n_ignored += int((got == 255).sum())
        assert set(np.unique(got)) - {255} <= {0} | {1 + classes.names.index(t) for t in ds.items[i].tags}
    assert n_ignored > 0  # the uncertain band is kept as 255, not forced to a class


def test_mask_dir_replaces_the_train_masks_only(run, labels, demo_root):
    from wsss.build import build_dataset, build_eval_dataset
    from wsss.config import load_config

    cfg = load_config(Path(run) / "config.yaml", ["--data.mask_dir", str(labels)])
    ds = build_dataset(cfg, "train", train=False, load_masks=True, use_mask_dir=True)
    for i in (0, 3):
        s = ds[i]
        assert np.array_equal(s["mask"].numpy(), np.asarray(Image.open(labels / f"{s['name']}.png")))
    # evaluation scores against the dataset's own masks, even on the train split
    gt0 = build_eval_dataset(cfg, "train")[0]
    assert np.array_equal(
        gt0["mask"].numpy(), np.asarray(Image.open(demo_root / "SegmentationClass" / f"{gt0['name']}.png"))
    )
    assert not np.array_equal(gt0["mask"].numpy(), ds[0]["mask"].numpy())
    val = build_dataset(cfg, "val", train=False, load_masks=True)[0]
    gt = np.asarray(Image.open(demo_root / "SegmentationClass" / f"{val['name']}.png"))
    assert np.array_equal(val["mask"].numpy(), gt)


def test_a_second_stage_learns_the_labels_in_mask_dir(demo_root, tmp_path):
    """fully_supervised on a mask_dir whose every label is `car` predicts car: it trains on that folder,
    not on the ground truth (where car is a minority class)."""
    from tests.conftest import TINY
    from wsss.api import load_run
    from wsss.build import build_dataset
    from wsss.data.classes import ClassSpec
    from wsss.data.io import write_mask

    d = tmp_path / "car"
    d.mkdir()
    for img in sorted((demo_root / "JPEGImages").glob("*.jpg")):
        w, h = Image.open(img).size
        write_mask(d / f"{img.stem}.png", np.full((h, w), 2, np.uint8), ClassSpec(("x",)).palette)
    run = tmp_path / "stage2"
    assert main(["train", "--config", "configs/bench/fully_supervised.yaml", "--run-dir", str(run),
                 "--data.root", str(demo_root), *TINY, "--data.mask_dir", str(d), "--train.max_iters", "12",
                 "--optim.lr", "1e-3"]) == 0  # fmt: skip
    cfg, method, _, _, _ = load_run(run)
    s = build_dataset(cfg, "val", train=False, load_masks=True)[0]
    with torch.no_grad():
        pred = method.predict_seg(s["image"][None]).argmax(1)
    assert (pred == 2).float().mean() > 0.75  # 0.88 measured
    assert (s["mask"] == 2).float().mean() < 0.5


def test_bad_mask_dirs_are_one_line_errors(run, labels, demo_root, tmp_path, capsys):
    from tests.conftest import TINY

    base = ["train", "--config", "configs/bench/fully_supervised.yaml", "--run-dir", str(tmp_path / "r"),
            "--data.root", str(demo_root), *TINY, "--train.max_iters", "1"]  # fmt: skip
    part = tmp_path / "part"
    part.mkdir()
    first = sorted(labels.glob("*.png"))[0]
    (part / first.name).write_bytes(first.read_bytes())
    assert main([*base, "--data.mask_dir", str(part)]) == 1
    err = capsys.readouterr().err.strip()
    assert "no mask for image" in err and "in data.mask_dir (7 of 8 missing)" in err and len(err.splitlines()) == 1
    other = tmp_path / "other"
    other.mkdir()
    (other / "pseudo_labels.json").write_text(json.dumps({"classes": ["background", "dog"], "images": []}))
    assert main([*base, "--data.mask_dir", str(other)]) == 1
    assert "labels of classes background, dog; this dataset's are background, boat" in capsys.readouterr().err
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    idx = json.loads((labels / "pseudo_labels.json").read_text())
    idx["images"][1]["done"] = False  # what an export that stopped before this image leaves
    (crashed / "pseudo_labels.json").write_text(json.dumps(idx))
    for f in labels.glob("*.png"):
        (crashed / f.name).write_bytes(f.read_bytes())
    assert main([*base, "--data.mask_dir", str(crashed)]) == 1
    assert "did not finish (1 images, e.g. train_00001); rerun wsss pseudo-labels" in capsys.readouterr().err
    assert main([*base, "--data.mask_dir", str(tmp_path / "nope")]) == 1
    assert "nope: data.mask_dir does not exist" in capsys.readouterr().err
    weak = ["train", "--config", "configs/bench/toco.yaml", *base[3:], "--data.mask_dir", str(labels)]
    assert main(weak) == 2
    assert "toco trains on tags and never reads masks" in capsys.readouterr().err


def test_export_never_replaces_a_file_it_did_not_write(run, labels, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    mine = out / "train_00000.png"
    mine.write_bytes(b"user's")
    assert main(["pseudo-labels", str(run), "--out", str(out)]) == 1
    assert "train_00000.png: exists and would be replaced (give --overwrite" in capsys.readouterr().err
    assert main(["pseudo-labels", str(run), "--out", str(out), "--overwrite"]) == 1  # no index lists it
    assert mine.read_bytes() == b"user's" and sorted(p.name for p in out.iterdir()) == ["train_00000.png"]
    before = (labels / "train_00001.png").read_bytes()
    assert main(["pseudo-labels", str(run), "--out", str(labels), "--overwrite"]) == 0  # its own earlier files
    assert (labels / "train_00001.png").read_bytes() == before
    assert main(["pseudo-labels", str(run), "--out", str(labels), "--overwrite", "--method.high_thre", "0.8"]) == 1
    assert "holds labels of another run or other settings" in capsys.readouterr().err
    assert (labels / "train_00001.png").read_bytes() == before
    assert main(["pseudo-labels", str(run), "--out", str(tmp_path / "c"), "--crf", "nope"]) == 2  # usage
    assert "--crf: unknown crf backend 'nope'; known: dense, torch" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_predict_index_lists_every_planned_file_after_a_crash_and_keeps_other_images(run, demo_root, tmp_path,
                                                                                      monkeypatch):  # fmt: skip
    import wsss.evaluation.predict as predict

    imgs = sorted((demo_root / "JPEGImages").glob("*.jpg"))[:2]
    out = tmp_path / "p"
    real, calls = predict.write_mask, []

    def crash_on_second(*a, **k):
        calls.append(a[0])
        if len(calls) == 2:
            raise RuntimeError("disk full")
        real(*a, **k)

    monkeypatch.setattr(predict, "write_mask", crash_on_second)
    with pytest.raises(RuntimeError, match="disk full"):
        main(["predict", str(run), *map(str, imgs), "--out", str(out)])
    monkeypatch.setattr(predict, "write_mask", real)
    index = json.loads((out / "predictions.json").read_text())
    assert [(im["name"], im["outputs"], im["done"]) for im in index["images"]] == [
        (imgs[0].stem, [f"{imgs[0].stem}.png"], False),
        (imgs[1].stem, [f"{imgs[1].stem}.png"], False),
    ]
    assert (out / f"{imgs[0].stem}.png").is_file()  # written before the crash, and listed
    assert main(["predict", str(run), *map(str, imgs), "--out", str(out), "--overwrite"]) == 0
    assert main(["predict", str(run), str(imgs[1]), "--out", str(out), "--overwrite"]) == 0  # a subset
    index = json.loads((out / "predictions.json").read_text())
    assert [im["name"] for im in index["images"]] == [imgs[0].stem, imgs[1].stem]
    assert all("done" not in im and "shares" in im for im in index["images"])


def test_crf_on_labels_fills_the_uncertain_band_by_colour():
    """Left half red, right half blue; labels: car on columns 0-4, 255 on 5-10, background on 11-15. The
    CRF gives the band's red columns (5-7) car and its blue ones (8-10) background."""
    from wsss.data.classes import ClassSpec
    from wsss.evaluation.pseudo_export import crf_labels

    classes = ClassSpec(("boat", "car"))
    img = torch.zeros(1, 3, 8, 16)
    img[0, 0, :, :8] = 255.0
    img[0, 2, :, 8:] = 255.0
    lab = torch.full((1, 8, 16), 255, dtype=torch.long)
    lab[..., :5] = 2
    lab[..., 11:] = 0
    out = crf_labels(lab, img, torch.tensor([[0.0, 1.0]]), classes, "torch")
    want = torch.zeros(1, 8, 16, dtype=torch.long)
    want[..., :8] = 2
    assert torch.equal(out, want)
    # boat is not tagged: it gets no pixel even where its unary would be the only one
    lab2 = torch.full((1, 8, 16), 1, dtype=torch.long)
    assert (crf_labels(lab2, img, torch.tensor([[0.0, 1.0]]), classes, "torch") != 1).all()


def test_deeplabv3_head_on_resnet50_is_torchvisions_deeplabv3():
    from torchvision.models.segmentation import deeplabv3_resnet50

    from wsss.build import build_method
    from wsss.config import load_config
    from wsss.data.classes import ClassSpec

    cfg = load_config("configs/bench/fully_supervised.yaml", ["--model.backbone", "resnet50", "--model.weights",
                      "none", "--model.output_stride", "8", "--method.head", "deeplabv3"])  # fmt: skip
    ours = build_method(cfg, ClassSpec(("a", "b"))).eval()
    tv = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=3, aux_loss=False).eval()
    sd = {k.replace("backbone.net.", "backbone.").replace("seg_head.", "classifier."): v
          for k, v in ours.state_dict().items()}  # fmt: skip
    tv.load_state_dict(sd)  # strict: the same parameters and buffers, name for name
    x = torch.randn(1, 3, 72, 88)
    with torch.no_grad():
        np.testing.assert_allclose(ours.predict_seg(x).numpy(), tv(x)["out"].numpy(), atol=1e-4)


def test_deeplabv3_with_one_image_per_step_is_a_config_error():
    from wsss.config import ConfigError, load_config

    args = ["--model.backbone", "resnet50", "--model.weights", "none", "--method.head", "deeplabv3"]
    load_config("configs/bench/fully_supervised.yaml", [*args, "--train.batch_size", "2"])
    with pytest.raises(ConfigError, match="deeplabv3's BatchNorm needs at least 2 images per step"):
        load_config(
            "configs/bench/fully_supervised.yaml", [*args, "--train.batch_size", "2", "--train.micro_batch", "1"]
        )
