"""One-off converters: ``wsss prepare voc`` (train_aug list + image-level labels) and ``wsss prepare coco``
(instance JSON -> 81-class semantic palette PNGs, image-level labels, split lists)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from wsss.data.classes import COCO, VOC, voc_palette
from wsss.data.datasets.voc import mask_dir, voc_root
from wsss.data.io import DataError, read_mask, write_mask
from wsss.utils.files import atomic_write

log = logging.getLogger(__name__)


def _progress(it, total: int, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(it, total=total, desc=desc, dynamic_ncols=True)
    except ImportError:  # pragma: no cover
        return it


VOC_VAL, VOC_TRAIN_AUG = 1449, 10582  # the standard split sizes (VOC 2012 val; VOC + SBD train minus val)


def prepare_voc(root: str | Path, sbd: str | Path | None = None, overwrite: bool = False) -> dict:
    """Write ImageSets/Segmentation/train_aug.txt (masks in SegmentationClassAug minus val) and
    cls_labels.json (tags from the masks); with ``sbd`` (SBD's benchmark_RELEASE folder) first build
    SegmentationClassAug from SBD's cls/*.mat and VOC's masks (``wsss.data.sbd``). An existing train_aug.txt or
    cls_labels.json is replaced only with ``overwrite``. Returns counts per split."""
    root = voc_root(Path(root))
    seg_sets = root / "ImageSets" / "Segmentation"
    if not (seg_sets / "val.txt").is_file():
        raise DataError(f"{seg_sets / 'val.txt'}: not found; is {root} a VOCdevkit/VOC2012 folder?")
    val = [ln.strip() for ln in (seg_sets / "val.txt").read_text().splitlines() if ln.strip()]
    for f in (seg_sets / "train_aug.txt", root / "cls_labels.json"):  # before any work: never replace a
        if f.exists() and not overwrite:  # list or label file the user may hold (e.g. another train_aug)
            raise DataError(f"{f}: exists; give --overwrite to replace it (wsss prepare writes it anew)")
    counts: dict = {}
    if sbd is not None:
        from wsss.data.sbd import convert_sbd

        counts["converted"] = convert_sbd(root, Path(sbd), _progress)
    if len(val) != VOC_VAL:
        log.warning("%s lists %d images (%d in VOC 2012 val)", seg_sets / "val.txt", len(val), VOC_VAL)
    md = mask_dir(root)
    if not md.is_dir():
        raise DataError(f"{md}: no masks folder (SegmentationClassAug or SegmentationClass)")
    val_set = set(val)
    counts["val"] = len(val)
    if md.name == "SegmentationClassAug":
        masks = sorted(p.stem for p in md.glob("*.png") if p.stem not in val_set)
        train_aug = [n for n in masks if (root / "JPEGImages" / f"{n}.jpg").is_file()]
        if len(train_aug) < len(masks):
            log.warning("%d masks in %s have no image in JPEGImages (e.g. %s); left out of train_aug",
                        len(masks) - len(train_aug), md, next(n for n in masks if n not in set(train_aug)))  # fmt: skip
        atomic_write(seg_sets / "train_aug.txt", lambda p: Path(p).write_text("\n".join(train_aug) + "\n"))
        counts["train_aug"] = len(train_aug)
        if len(train_aug) != VOC_TRAIN_AUG:
            log.warning("train_aug has %d images (%d expected with the full SBD augmentation)", len(train_aug),
                        VOC_TRAIN_AUG)  # fmt: skip
    else:
        log.warning("%s missing: only the 1,464 VOC train masks; for train_aug run `wsss prepare voc %s --sbd "
                    "benchmark_RELEASE` (SBD's benchmark.tgz, see the README)", root / "SegmentationClassAug",
                    root)  # fmt: skip
    names = sorted({ln.strip() for p in seg_sets.glob("*.txt") for ln in p.read_text().splitlines() if ln.strip()})
    labels = {}
    for n in _progress(names, len(names), "image-level labels"):
        mp = md / f"{n}.png"
        if mp.is_file():
            labels[n] = VOC.tags_from_mask(read_mask(mp))
    atomic_write(root / "cls_labels.json", lambda p: Path(p).write_text(json.dumps(labels)))
    counts["labelled"] = len(labels)
    return counts


def coco_semantic_mask(coco, img_id: int, cat_to_label: dict[int, int]) -> np.ndarray:
    """(H, W) uint8 labels of one image: crowd regions 255, then instances painted largest first so that
    small objects stay visible on top of large ones."""
    info = coco.imgs[img_id]
    mask = np.zeros((info["height"], info["width"]), dtype=np.uint8)
    anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
    for a in anns:
        if a.get("iscrowd", 0):
            mask[coco.annToMask(a) > 0] = 255
    for a in sorted((a for a in anns if not a.get("iscrowd", 0)), key=lambda a: -a["area"]):
        mask[coco.annToMask(a) > 0] = cat_to_label[a["category_id"]]
    return mask


def prepare_coco(root: str | Path, splits: tuple[str, ...] = ("train", "val")) -> dict:
    """Convert ``annotations/instances_{split}2014.json`` to SegmentationClass/<name>.png once
    (existing PNGs are kept), and write split lists and cls_labels.json."""
    try:
        from pycocotools.coco import COCO as COCOApi
    except ImportError:
        raise DataError("pycocotools is needed: pip install 'wsss[coco]'") from None
    root = Path(root)
    out_dir = root / "SegmentationClass"
    labels_path = root / "cls_labels.json"
    labels = json.loads(labels_path.read_text()) if labels_path.is_file() else {}
    counts = {}
    palette = voc_palette().flatten().tolist()
    for split in splits:
        ann = root / "annotations" / f"instances_{split}2014.json"
        if not ann.is_file():
            raise DataError(f"{ann}: annotation file not found")
        coco = COCOApi(str(ann))
        cat_ids = sorted(coco.getCatIds())
        if len(cat_ids) != COCO.num_fg:
            raise DataError(f"{ann}: {len(cat_ids)} categories, expected {COCO.num_fg}")
        cat_to_label = {c: i + 1 for i, c in enumerate(cat_ids)}
        names = []
        ids = sorted(coco.getImgIds())
        for img_id in _progress(ids, len(ids), f"coco {split}"):
            if not coco.getAnnIds(imgIds=img_id, iscrowd=False):
                continue  # images without any of the 80 categories are not part of the WSSS splits
            name = Path(coco.imgs[img_id]["file_name"]).stem
            mp = out_dir / f"{name}.png"
            if mp.is_file():
                mask = read_mask(mp)
            else:
                mask = coco_semantic_mask(coco, img_id, cat_to_label)
                write_mask(mp, mask, palette)
            labels[name] = COCO.tags_from_mask(mask)
            names.append(name)
        sets = root / "ImageSets" / "Segmentation"
        sets.mkdir(parents=True, exist_ok=True)
        (sets / f"{split}.txt").write_text("\n".join(names) + "\n")
        counts[split] = len(names)
    atomic_write(labels_path, lambda p: Path(p).write_text(json.dumps(labels)))
    return counts
