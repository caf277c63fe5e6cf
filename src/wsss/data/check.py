"""``wsss data check``: every problem of a dataset root at once, one line each."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from wsss.data.base import Item
from wsss.data.classes import ClassSpec
from wsss.data.io import (
    WIDE_MODES,
    DataError,
    check_mask_mode,
    check_mask_size,
    check_mask_values,
    fit_side,
    image_header,
    inspect_image,
    read_mask,
)
from wsss.data.spec import Problems

LARGE_SIDE = 2048  # beyond this a ViT's whole-image evaluation runs out of time or memory on most machines
TINY_SIDE = 16  # under one ViT patch: the image is upscaled to the crop and its CAM is a few blurred tokens


def preflight(ds, progress=None) -> list[str]:
    """The fast pass ``wsss train`` makes over a dataset before iteration 1: every image's and (when the
    split is read with masks) every mask's header is opened, nothing is decoded. Returns one message per
    problem: missing or unreadable files, decompression bombs, 16/32-bit images, masks that are not
    palette/grey PNGs or not their image's displayed size. (Truncated pixel data shows only on decode:
    ``wsss data check`` decodes; training skips such an image with a warning.)"""
    problems = []
    items = ds.items if progress is None else progress(ds.items)
    for it in items:
        try:
            mode, size = image_header(it.image)
            if mode in WIDE_MODES:
                raise DataError(f"{it.image}: {mode} (16/32-bit) image; convert it to 8-bit RGB")
            if ds.load_masks and it.mask is not None:
                mode, msize = image_header(it.mask, "mask")
                check_mask_mode(it.mask, mode)
                if msize != fit_side(size, getattr(ds, "max_side", 0)):  # pseudo labels exported under max_side
                    check_mask_size(it.mask, msize, size)
        except DataError as e:
            problems.append(str(e))
    return problems


def class_counts(items: Iterable[Item], classes: ClassSpec) -> list[tuple[str, str]]:
    """One ``info`` line with the number of images tagged with each class that has any, and one warning listing
    the classes no image carries (their classifier rows only ever see negatives: their CAMs never learn).
    ``items``: a dataset's Items."""
    counts = dict.fromkeys(classes.names, 0)
    for item in items:
        for t in set(item.tags):
            if t in counts:
                counts[t] += 1
    out = [("info", "images per class: " + (", ".join(f"{c} {n}" for c, n in counts.items() if n) or "none"))]
    if missing := [c for c, n in counts.items() if n == 0]:
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        out.append(("warning", f"{len(missing)} of {len(counts)} classes are on no image and cannot be learned: "
                    f"{', '.join(missing[:8])}{more}"))  # fmt: skip
    return out


def check_items(items: Iterable[Item], classes: ClassSpec, report_untagged: bool = True) -> Problems:
    """The problems of every image of ``items`` (a dataset's :class:`~wsss.data.base.Item` list): tags outside
    ``classes`` (and, with ``report_untagged``, none at all), unreadable, large and tiny images, masks of
    the wrong mode, size or values; plus the class counts."""
    items = list(items)
    out = class_counts(items, classes)
    for item in items:
        img, mask, tags = item.image, item.mask, item.tags
        if not tags and report_untagged:
            out.append(("error", f"{img}: image has no tags"))
        for t in tags:
            if t not in classes.names:
                out.append(("error", f"{img}: unknown tag '{t}'"))
        prob, size = inspect_image(img)
        if prob:
            out.append(prob)
        if size is not None and max(size) > LARGE_SIDE:
            out.append(("warning", f"{img}: large image ({size[0]}x{size[1]}): slow to train and evaluate at full "
                        f"size; --data.max_side {LARGE_SIDE} reads it downscaled"))  # fmt: skip
        if size is not None and min(size) < TINY_SIDE:
            out.append(("warning", f"{img}: tiny image ({size[0]}x{size[1]}): under {TINY_SIDE} px a side it is "
                        "mostly upscaled padding to the model"))  # fmt: skip
        if mask is not None and mask.is_file() and size is not None:
            try:
                check_mask_values(mask, read_mask(mask, size), classes.K, classes.ignore_index)
            except DataError as e:
                out.append(("error", str(e)))
    return out


def check_root(root: str | Path, dataset: str = "auto") -> Problems:
    """(severity, message) for every problem found under ``root`` by the registered ``dataset``'s check;
    ``auto`` picks the dataset that recognises the root's files (VOC, COCO 2014 as written by ``wsss prepare
    coco``, a tagged folder, or a plugin's)."""
    from wsss.data.spec import detect
    from wsss.registry import DATASETS

    root = Path(root)
    if not root.is_dir():
        return [("error", f"{root}: data root does not exist")]
    specs = DATASETS.entries()
    if dataset == "auto":
        found = detect(root, specs)
        if found is None:
            layouts = "; ".join(f"{n}: {e.layout}" for n, e in sorted(specs.items()) if getattr(e, "layout", ""))
            return [("error", f"{root}: no dataset layout recognised ({layouts}); give --dataset")]
        dataset = found
    if dataset not in specs:
        raise KeyError(dataset)
    check = getattr(specs[dataset], "check", None)
    if check is None:
        return [("warning", f"{root}: dataset '{dataset}' has no checks; only training will find its problems")]
    return check(root)
