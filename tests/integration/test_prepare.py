"""`wsss prepare voc|coco` on tiny hand-made inputs."""

import json

import numpy as np
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
    assert main(["prepare", "coco", str(tmp_path)]) == 2

    assert prepare_coco(tmp_path, ("train",)) == {"train": 1}
    m = read_mask(tmp_path / "SegmentationClass" / "COCO_train2014_000000000001.png")
    assert m[3, 0] == 1 and m[3, 3] == 80 and m[7, 7] == 0  # person = 1, toothbrush (id 90) = 80, on top
    labels = json.loads((tmp_path / "cls_labels.json").read_text())
    assert labels == {"COCO_train2014_000000000001": ["person", "toothbrush"]}
    assert (tmp_path / "ImageSets" / "Segmentation" / "train.txt").read_text().split() == [
        "COCO_train2014_000000000001"
    ]


def test_prepare_voc_builds_train_aug_and_labels(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "val.txt").write_text("v1\n")
    (sets / "train.txt").write_text("t1\n")
    pal = voc_palette().flatten().tolist()
    for name, val in (("v1", 15), ("t1", 8), ("s1", 1)):
        write_mask(root / "SegmentationClassAug" / f"{name}.png", np.full((4, 4), val, np.uint8), pal)
    assert main(["prepare", "voc", str(root.parent)]) == 0
    assert (sets / "train_aug.txt").read_text().split() == ["s1", "t1"]
    labels = json.loads((root / "cls_labels.json").read_text())
    assert labels == {"s1": ["aeroplane"], "t1": ["cat"], "v1": ["person"]}
