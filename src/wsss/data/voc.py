"""VOC-layout datasets: PASCAL VOC 2012 (+SBD train_aug), the built-in demo data and COCO 2014.

Layout read (written by ``wsss prepare voc|coco`` and ``wsss data demo``)::

    ROOT/JPEGImages/<name>.jpg            (COCO: ROOT/train2014|val2014/<name>.jpg)
    ROOT/SegmentationClassAug/<name>.png  (or SegmentationClass/)
    ROOT/ImageSets/Segmentation/<split>.txt
    ROOT/cls_labels.json                  {name: [tag, ...]} image-level labels
    ROOT/classes.txt                      optional: foreground class names, one a line
"""

from __future__ import annotations

import json
from pathlib import Path

from wsss.data.base import Item, SegDataset, data_root, read_list
from wsss.data.classes import COCO, VOC, ClassSpec
from wsss.data.io import DataError
from wsss.registry import DATASETS


def read_classes_txt(path: Path) -> tuple[str, ...]:
    """Class names from a classes.txt (one a line; a leading 'background' line is skipped)."""
    names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if names and names[0].lower() in ("background", "__background__", "_background_"):
        names = names[1:]
    if len(set(names)) != len(names):
        raise DataError(f"{path}: duplicate class names")
    return tuple(names)


def mask_dir(root: Path) -> Path:
    """SegmentationClassAug when present (VOC + SBD), else SegmentationClass."""
    aug = root / "SegmentationClassAug"
    return aug if aug.is_dir() else root / "SegmentationClass"


def read_voc_layout(root: Path, split: str, classes: ClassSpec, image_dir=None) -> list[Item]:
    """Items of ``split`` under a VOC-layout root; tags from cls_labels.json."""
    names = read_list(root / "ImageSets" / "Segmentation" / f"{split}.txt")
    labels = read_cls_labels(root)
    mdir = mask_dir(root)
    items = []
    for n in names:
        img = (image_dir(n) if image_dir else root / "JPEGImages") / f"{n}.jpg"
        if n not in labels:
            raise DataError(f"{img}: no image-level labels in cls_labels.json")
        mp = mdir / f"{n}.png"
        items.append(Item(n, img, mp if mp.is_file() else None, tuple(labels[n])))
    return items


def read_cls_labels(root: Path) -> dict[str, list[str]]:
    """{name: [tag, ...]} from ROOT/cls_labels.json; missing or invalid JSON raises DataError."""
    path = root / "cls_labels.json"
    if not path.is_file():
        raise DataError(f"{path}: image-level labels missing; run `wsss prepare` on {root}")
    try:
        labels = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid UTF-8 JSON ({e})") from None
    if not isinstance(labels, dict):
        raise DataError(f"{path}: expected an object {{image name: [tag, ...]}}, got {type(labels).__name__}")
    for name, tags in labels.items():
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise DataError(f"{path}: {name!r}: tags must be a list of class names, got {tags!r}"[:300])
    return labels


def classes_for_root(root: Path, default: ClassSpec = VOC) -> ClassSpec:
    """ClassSpec from ROOT/classes.txt when present, else ``default``."""
    ct = root / "classes.txt"
    return ClassSpec(read_classes_txt(ct)) if ct.is_file() else default


def voc_root(root: Path) -> Path:
    """ROOT/VOC2012 when given a VOCdevkit folder, else ROOT."""
    return root / "VOC2012" if (root / "VOC2012").is_dir() else root


def _build(name: str, default: ClassSpec, image_dir_fn=None):
    def build(cfg, split: str, transform, load_masks: bool) -> SegDataset:
        """The ``split`` of this VOC-layout dataset (root from data.train_root/val_root or data.root)."""
        explicit = (cfg.train_root if split == cfg.train_split else cfg.val_root) or cfg.root
        root = voc_root(data_root(explicit, name))
        classes = classes_for_root(root, default)
        items = read_voc_layout(root, split, classes, image_dir_fn(root) if image_dir_fn else None)
        return SegDataset(items, classes, transform, load_masks)

    return build


def is_coco_root(root: Path) -> bool:
    """A COCO 2014 root: its train2014/ or val2014/ image folders or instance annotations are there."""
    return any((root / d).is_dir() for d in ("train2014", "val2014")) or any(
        (root / "annotations" / f"instances_{s}2014.json").is_file() for s in ("train", "val")
    )


def coco_image_dir(root: Path):
    """name -> the folder of its image: COCO_train2014_... in train2014/, COCO_val2014_... in val2014/."""

    def fn(name: str) -> Path:
        # COCO_train2014_000000000009 lives in train2014/
        part = name.split("_")[1] if name.startswith("COCO_") else "JPEGImages"
        return root / part

    return fn


# Each VOC-layout dataset: its default classes (without a classes.txt) and where its images are (None:
# JPEGImages/); `wsss data check` reads the same table.
LAYOUTS = {"voc": (VOC, None), "demo": (VOC, None), "coco": (COCO, coco_image_dir)}
for _name, (_classes, _images) in LAYOUTS.items():
    DATASETS.register(_name)(_build(_name, _classes, _images))
