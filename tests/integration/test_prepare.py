"""`wsss prepare voc|coco` on tiny hand-made inputs."""

import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from wsss.cli import main
from wsss.data.classes import voc_palette
from wsss.data.io import read_mask, write_mask

COCO_IDS = [i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]


def test_prepare_coco_paints_small_objects_on_top_and_maps_ids(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "train2014").mkdir()
    for n in (1, 2):
        Image.new("RGB", (8, 8)).save(tmp_path / "train2014" / f"COCO_train2014_{n:012d}.jpg")
    big = [[0, 0, 4, 0, 4, 8, 0, 8]]  # left half
    small = [[2, 2, 6, 2, 6, 4, 2, 4]]
    ann = {
        "images": [{"id": n, "file_name": f"COCO_train2014_{n:012d}.jpg", "height": 8, "width": 8} for n in (1, 2)],
        "categories": [{"id": i, "name": f"c{i}"} for i in COCO_IDS],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "segmentation": big,
                "area": 32,
                "iscrowd": 0,
                "bbox": [0, 0, 4, 8],
            },
            {
                "id": 2,
                "image_id": 1,
                "category_id": 90,
                "segmentation": small,
                "area": 8,
                "iscrowd": 0,
                "bbox": [2, 2, 4, 2],
            },
        ],
    }
    (tmp_path / "annotations" / "instances_train2014.json").write_text(json.dumps(ann))
    from wsss.data.prepare import prepare_coco

    # the CLI converts train and val; only train exists here, so its missing val file is a named error
    assert main(["prepare", "coco", str(tmp_path)]) == 1

    assert prepare_coco(tmp_path, ("train",)) == {"train": 1}
    m = read_mask(tmp_path / "SegmentationClass" / "COCO_train2014_000000000001.png")
    assert m[3, 0] == 1 and m[3, 3] == 80 and m[7, 7] == 0  # person = 1, toothbrush (id 90) = 80, on top
    labels = json.loads((tmp_path / "cls_labels.json").read_text())
    assert labels == {"COCO_train2014_000000000001": ["person", "toothbrush"]}
    assert (tmp_path / "ImageSets" / "Segmentation" / "train.txt").read_text().split() == [
        "COCO_train2014_000000000001"
    ]


def _voc_root(tmp_path, val: str, train: str, images: str | list[str], size=(5, 4)):
    """VOCdevkit/VOC2012 with val/train split lists of one name each and black JPEGs of ``images``."""
    root = tmp_path / "VOCdevkit" / "VOC2012"
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "val.txt").write_text(val + "\n")
    (sets / "train.txt").write_text(train + "\n")
    (root / "JPEGImages").mkdir()
    for n in images:
        Image.new("RGB", size).save(root / "JPEGImages" / f"{n}.jpg")
    return root, sets


def test_prepare_voc_builds_train_aug_and_labels(tmp_path):
    root, sets = _voc_root(tmp_path, "v1", "t1", ["v1", "t1", "s1"], size=(4, 4))  # x1: a mask without its image
    pal = voc_palette().flatten().tolist()
    for name, val in (("v1", 15), ("t1", 8), ("s1", 1), ("x1", 2)):
        write_mask(root / "SegmentationClassAug" / f"{name}.png", np.full((4, 4), val, np.uint8), pal)
    assert main(["prepare", "voc", str(root.parent)]) == 0
    assert (sets / "train_aug.txt").read_text().split() == ["s1", "t1"]
    labels = json.loads((root / "cls_labels.json").read_text())
    assert labels == {"s1": ["aeroplane"], "t1": ["cat"], "v1": ["person"]}
    # a second run would replace both files: only with --overwrite, refused before any work otherwise
    (sets / "train_aug.txt").write_text("the user's list\n")
    assert main(["prepare", "voc", str(root.parent)]) == 1
    assert (sets / "train_aug.txt").read_text() == "the user's list\n"
    assert main(["prepare", "voc", str(root.parent), "--overwrite"]) == 0
    assert (sets / "train_aug.txt").read_text().split() == ["s1", "t1"]


def _voc_with_sbd(tmp_path):
    """A VOC root (images a, b, c, v; VOC masks for b and v; val = v) and an SBD folder (masks a, b, c)."""
    from scipy.io import savemat

    root, _ = _voc_root(tmp_path, "v", "b", "abcv")
    pal = voc_palette().flatten().tolist()
    voc_b = np.array([[255, 255, 0, 0, 0], [15, 15, 0, 0, 0], [15, 15, 0, 0, 0], [0, 0, 0, 0, 0]], np.uint8)
    write_mask(root / "SegmentationClass" / "b.png", voc_b, pal)
    write_mask(root / "SegmentationClass" / "v.png", np.full((4, 5), 12, np.uint8), pal)
    cls = tmp_path / "benchmark_RELEASE" / "dataset" / "cls"
    cls.mkdir(parents=True)
    sbd = {"a": np.arange(20, dtype=np.uint8).reshape(4, 5) + 1, "b": np.full((4, 5), 3, np.uint8),
           "c": np.zeros((4, 5), np.uint8)}  # fmt: skip
    sbd["c"][0, 0] = 20
    sbd["z"] = np.ones((4, 5), np.uint8)  # an SBD name whose image is not in JPEGImages: skipped
    for n, seg in sbd.items():
        gt = {"Segmentation": seg, "Boundaries": np.zeros((1,), object), "CategoriesPresent": np.unique(seg)}
        savemat(cls / f"{n}.mat", {"GTcls": gt})
    return root, tmp_path / "benchmark_RELEASE", sbd, voc_b


def test_prepare_voc_converts_sbd_mats_into_segmentation_class_aug(tmp_path, capsys, caplog):
    root, sbd_dir, sbd, voc_b = _voc_with_sbd(tmp_path)
    aug = root / "SegmentationClassAug"
    aug.mkdir()
    users = np.full((4, 5), 7, np.uint8)  # a mask already there is the user's: kept byte for byte
    write_mask(aug / "c.png", users, voc_palette().flatten().tolist())
    (aug / "a.png").symlink_to(tmp_path / "nowhere.png")  # so is a dangling link
    before = (aug / "c.png").read_bytes()
    assert main(["prepare", "voc", str(root.parent), "--sbd", str(sbd_dir)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["converted"] == {"sbd": 0, "voc": 2, "kept": 2, "missing_images": 1}
    assert not (aug / "z.png").exists() and "e.g. z.jpg" in caplog.text
    assert (aug / "a.png").is_symlink() and not (tmp_path / "nowhere.png").exists()
    (aug / "a.png").unlink()
    capsys.readouterr()
    assert main(["prepare", "voc", str(root.parent), "--sbd", str(sbd_dir), "--overwrite"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["converted"]["sbd"] == 1
    assert np.array_equal(read_mask(aug / "a.png"), sbd["a"])  # all 21 class indices survive the PNG
    assert np.array_equal(read_mask(aug / "b.png"), voc_b)  # VOC's own mask (void border) wins over SBD's
    assert np.array_equal(read_mask(aug / "v.png"), np.full((4, 5), 12, np.uint8))
    assert (aug / "c.png").read_bytes() == before
    assert out["train_aug"] == 3 and out["val"] == 1
    assert (root / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split() == ["a", "b", "c"]
    labels = json.loads((root / "cls_labels.json").read_text())
    assert labels["b"] == ["person"] and labels["c"] == ["car"] and labels["v"] == ["dog"]
    assert len(labels["a"]) == 20
    assert "10582 expected" in caplog.text and "1449 in VOC 2012 val" in caplog.text
    # the dataset then builds its train_aug split from the converted masks
    assert main(["data", "check", str(root)]) == 0


def _errors(capsys) -> list[str]:
    """stderr's lines less the progress bar's; a traceback fails the test."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [ln for ln in err.strip().splitlines() if ln.strip() and "it/s]" not in ln and "s/it]" not in ln]


def test_prepare_voc_sbd_errors_are_one_line(tmp_path, capsys):
    from scipy.io import savemat

    root, sbd_dir, _, _ = _voc_with_sbd(tmp_path)
    bad = sbd_dir / "dataset" / "cls" / "d.mat"
    savemat(bad, {"GTcls": {"Segmentation": np.full((4, 5), 30, np.uint8)}})
    Image.new("RGB", (5, 4)).save(root / "JPEGImages" / "d.jpg")
    assert main(["prepare", "voc", str(root), "--sbd", str(sbd_dir)]) == 1
    err = _errors(capsys)
    assert len(err) == 1 and str(bad) in err[0] and "classes 0..20" in err[0] and "30..30" in err[0]
    (sbd_dir / "dataset" / "cls" / "e.mat").write_bytes(b"not a mat file")
    bad.unlink()
    shutil.rmtree(root / "SegmentationClassAug")
    (root / "ImageSets" / "Segmentation" / "train_aug.txt").unlink(missing_ok=True)
    assert main(["prepare", "voc", str(root), "--sbd", str(sbd_dir)]) == 1
    err = _errors(capsys)
    assert len(err) == 1 and "e.mat: not an SBD class mask" in err[0]
    assert not any((root / "SegmentationClassAug").glob("*.png"))  # the header check comes before any write
    assert main(["prepare", "voc", str(root), "--sbd", str(tmp_path / "nowhere")]) == 1
    assert "no SBD cls/ folder" in capsys.readouterr().err


def test_data_check_reads_a_coco_root_with_coco_classes(tmp_path, capsys):
    """The layout `wsss prepare coco` writes: images under train2014/ and val2014/, COCO's 80 classes."""
    root = tmp_path / "coco"
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    names = {"train": "COCO_train2014_000000000009", "val": "COCO_val2014_000000000042"}
    for split, n in names.items():
        (root / f"{split}2014").mkdir()
        Image.new("RGB", (6, 4)).save(root / f"{split}2014" / f"{n}.jpg")
        (sets / f"{split}.txt").write_text(n + "\n")
        write_mask(root / "SegmentationClass" / f"{n}.png", np.full((4, 6), 24, np.uint8),
                   voc_palette().flatten().tolist())  # fmt: skip
    (root / "cls_labels.json").write_text(json.dumps({names["train"]: ["giraffe"], names["val"]: ["toothbrush"]}))
    assert main(["data", "check", str(root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "info: images per class: giraffe 1, toothbrush 1" in out  # COCO's order: giraffe is class 24
    assert any("78 of 80 classes are on no image and cannot be learned: person, bicycle, car, motorcycle, airplane, "
               "bus, train, truck and 70 more" in m for m in out)  # fmt: skip
    assert out[-1] == "0 errors, 3 warnings"  # the class warning and two 6x4 images
    (root / "cls_labels.json").write_text(json.dumps({names["train"]: ["giraffe"], names["val"]: ["aeroplane"]}))
    (root / "val2014" / f"{names['val']}.jpg").unlink()
    assert main(["data", "check", str(root)]) == 1
    out = capsys.readouterr().out
    errors = [m for m in out.splitlines() if m.startswith("error")]
    assert "unknown tag 'aeroplane'" in out and f"val2014/{names['val']}.jpg" in out
    assert not any("giraffe" in m for m in errors)


def test_cls_labels_of_the_wrong_shape_are_one_line(tmp_path, capsys):
    """Nested lists or a list at the top of cls_labels.json: one line naming the file (was a TypeError in
    data check's class counts)."""
    root = tmp_path / "voc"
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("x\n")
    for text, expected in (('{"x": [["dog"]]}', "cls_labels.json: 'x': tags must be a list of class names, got "
                            "[['dog']]"), ('["dog"]', "cls_labels.json: expected an object")):  # fmt: skip
        (root / "cls_labels.json").write_text(text)
        assert main(["data", "check", str(root)]) == 1
        out = capsys.readouterr().out
        assert expected in out and "Traceback" not in out


def test_prepare_and_check_name_the_registered_datasets(tmp_path, capsys):
    # what `wsss prepare` and `wsss data check` accept comes from the datasets' registry, not a list in the CLI
    assert main(["prepare", "folder", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "wsss: error: dataset 'folder' has no `wsss prepare` conversion; datasets with one: coco, voc"
    assert main(["prepare", "vocc", str(tmp_path)]) == 2
    assert "unknown dataset 'vocc' (did you mean 'voc'?)" in capsys.readouterr().err
    assert main(["data", "check", str(tmp_path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"error: {tmp_path}: no dataset layout recognised (coco: COCO 2014 (train2014/, val2014/); "
                      "folder: folder (images/, tags.csv); voc: VOC (JPEGImages/, ImageSets/Segmentation/, "
                      "cls_labels.json)); give --dataset")  # fmt: skip
    from wsss.data.spec import detect
    from wsss.registry import DATASETS

    (tmp_path / "ImageSets").mkdir()
    assert detect(tmp_path, DATASETS.entries()) == "voc"
    (tmp_path / "train2014").mkdir()  # a prepared COCO root also has VOC's split lists: COCO's folders decide
    assert detect(tmp_path, DATASETS.entries()) == "coco"
    (tmp_path / "tags.csv").write_text("image,tags\n")  # a user's folder wins over both
    assert detect(tmp_path, DATASETS.entries()) == "folder"


def test_voc_training_and_data_check_read_the_layout_the_same_way(tmp_path):
    """One reader behind both: an image listed without labels stops the dataset at that image, and data check
    names it (and each other one) instead; listed images with labels are checked, with their masks."""
    from types import SimpleNamespace

    from wsss.data.check import check_root
    from wsss.data.datasets.voc import read_voc_layout
    from wsss.data.io import DataError
    from wsss.registry import DATASETS

    root, sets = _voc_root(tmp_path, "v1", "t1", ["v1", "t1", "t2"])
    (sets / "train.txt").write_text("t1 extra-column\nt2\n\n")
    (root / "cls_labels.json").write_text(json.dumps({"v1": ["cat"], "t1": ["dog"]}))
    write_mask(root / "SegmentationClassAug" / "v1.png", np.full((4, 5), 8, np.uint8), voc_palette().flatten().tolist())
    img = root / "JPEGImages" / "t2.jpg"
    with pytest.raises(DataError, match="^" + re.escape(f"{img}: no image-level labels in cls_labels.json") + "$"):
        read_voc_layout(root, "train", DATASETS.get("voc").classes)
    val = DATASETS.get("voc").build(SimpleNamespace(root=str(root), train_root="", val_root="", train_split="train"),
                                    "val", None, True)  # fmt: skip
    assert [(i.name, i.tags, i.mask.name) for i in val.items] == [("v1", ("cat",), "v1.png")]
    errors = [m for sev, m in check_root(root.parent, "voc") if sev == "error"]
    assert errors == [f"{img}: no image-level labels in cls_labels.json"]
