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
import logging
from collections.abc import Iterator
from pathlib import Path

from wsss.data.base import Item, SegDataset, data_root, read_list
from wsss.data.classes import COCO, VOC, ClassSpec
from wsss.data.io import DataError
from wsss.data.spec import DatasetSpec, Problems
from wsss.registry import DATASETS

log = logging.getLogger("wsss")


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
    """Items of ``split`` under a VOC-layout root; tags from cls_labels.json; the first problem raises DataError."""
    items = []
    for entry in voc_items(root, read_list(root / "ImageSets" / "Segmentation" / f"{split}.txt"),
                           read_cls_labels(root), image_dir):  # fmt: skip
        if isinstance(entry, str):
            raise DataError(entry)
        items.append(entry)
    return items


def voc_items(root: Path, names, labels: dict[str, list[str]], image_dir=None) -> Iterator[Item | str]:
    """For each name, its Item (image, mask when the mask folder has one, tags) or, when it cannot be
    listed, the one-line problem: the single reader behind training (which stops at the first problem)
    and ``data check`` (which lists them all)."""
    mdir = mask_dir(root)
    for n in names:
        img = (image_dir(n) if image_dir else root / "JPEGImages") / f"{n}.jpg"
        if n not in labels:
            yield f"{img}: no image-level labels in cls_labels.json"
            continue
        mp = mdir / f"{n}.png"
        yield Item(n, img, mp if mp.is_file() else None, tuple(labels[n]))


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


class VOCLayout(DatasetSpec):
    """A VOC-layout dataset.

    Args:
        name: its registered name (the ``$WSSS_DATA/<name>`` default root).
        classes: its classes when the root has no classes.txt.
        image_dir_fn: ``fn(root)`` -> (name -> folder of its image); None: JPEGImages/.
        recognise: ``fn(root)`` -> bool, whether a root has this layout (None: never auto-detected).
        surely: the detection score when ``recognise`` says yes.
        prepare_fn: ``fn(root, sbd, overwrite)`` -> counts, the one-off conversion (None: nothing to prepare).
        generate_fn: ``fn(root)`` writing the whole dataset into ``root`` (None: it must be downloaded).
    """

    def __init__(self, name: str, classes: ClassSpec, image_dir_fn=None, recognise=None, surely: int = 1,
                 layout: str = "", prepare_fn=None, generate_fn=None) -> None:  # fmt: skip
        self.name, self.image_dir_fn, self.layout = name, image_dir_fn, layout
        self.classes: ClassSpec = classes
        self.recognise, self.surely, self.prepare_fn, self.generate_fn = recognise, surely, prepare_fn, generate_fn

    def build(self, cfg, split: str, transform, load_masks: bool) -> SegDataset:
        """The ``split`` of this dataset (root from data.train_root/val_root or data.root)."""
        explicit = (cfg.train_root if split == cfg.train_split else cfg.val_root) or cfg.root
        root = voc_root(data_root(explicit, self.name))
        classes = classes_for_root(root, self.classes)
        items = read_voc_layout(root, split, classes, self.image_dir_fn(root) if self.image_dir_fn else None)
        return SegDataset(items, classes, transform, load_masks)

    def detect(self, root: Path) -> int:
        """``surely`` when ROOT (or ROOT/VOC2012) has this layout, else 0."""
        return self.surely if self.recognise is not None and self.recognise(voc_root(root)) else 0

    def check(self, root: Path) -> Problems:
        """Labels, split lists, images, masks and tags of every image in any split list."""
        from wsss.data.check import check_items

        root = voc_root(root)
        try:
            labels = read_cls_labels(root)
        except DataError as e:
            return [("error", str(e))]
        problems: Problems = []
        lists = sorted((root / "ImageSets" / "Segmentation").glob("*.txt"))
        if not lists:
            problems.append(("error", f"{root / 'ImageSets' / 'Segmentation'}: no split lists"))
        names = sorted({n for p in lists for n in read_list(p)})
        items = []
        for entry in voc_items(root, names, labels, self.image_dir_fn(root) if self.image_dir_fn else None):
            if isinstance(entry, str):
                problems.append(("error", entry))
            else:
                items.append(entry)
        return problems + check_items(items, classes_for_root(root, self.classes))

    def prepare(self, root: Path, sbd: str | None = None, overwrite: bool = False) -> dict:
        """The one-off conversion of a downloaded root (see wsss.data.prepare)."""
        if self.prepare_fn is None:
            raise NotImplementedError(f"dataset '{self.name}' has no conversion")
        return self.prepare_fn(root, sbd, overwrite)

    def can_prepare(self) -> bool:
        """True when the layout was given a conversion (voc, coco; not the demo data)."""
        return self.prepare_fn is not None

    def generate(self, root: Path) -> bool:
        """Writes the dataset into ``root`` when the layout was given a generator (the demo data)."""
        if self.generate_fn is None:
            return False
        self.generate_fn(root)
        return True


def _has_voc_files(root: Path) -> bool:
    return any((root / m).exists() for m in ("JPEGImages", "ImageSets", "cls_labels.json"))


def _prepare_voc(root: Path, sbd: str | None, overwrite: bool) -> dict:
    from wsss.data.prepare import prepare_voc

    return prepare_voc(root, sbd, overwrite)


def _prepare_coco(root: Path, sbd: str | None, overwrite: bool) -> dict:
    from wsss.config import ConfigError
    from wsss.data.prepare import prepare_coco

    if sbd:
        raise ConfigError("--sbd belongs to `wsss prepare voc`")
    return prepare_coco(root)


def _generate_demo(root: Path) -> None:
    from wsss.data.synthetic import generate

    log.info("generating demo data in %s", root)
    generate(root)


DATASETS.register("voc")(VOCLayout("voc", VOC, recognise=_has_voc_files, layout="VOC (JPEGImages/, "
                                   "ImageSets/Segmentation/, cls_labels.json)", prepare_fn=_prepare_voc))  # fmt: skip
# a COCO root written by `wsss prepare coco` has VOC's split lists too: COCO's image folders decide
DATASETS.register("coco")(VOCLayout("coco", COCO, coco_image_dir, recognise=is_coco_root, surely=2,
                                    layout="COCO 2014 (train2014/, val2014/)", prepare_fn=_prepare_coco))  # fmt: skip
# `wsss data demo` output: VOC's layout and classes, read as voc
DATASETS.register("demo")(VOCLayout("demo", VOC, generate_fn=_generate_demo))
