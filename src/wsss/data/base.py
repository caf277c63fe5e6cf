"""The dataset every data source produces: a list of items plus a ClassSpec.

A sample is a dict: ``image`` (3, H, W) float, ``tags`` (num_fg,) multi-hot, ``valid`` (H, W) bool
(False on crop padding), optional ``mask`` (H, W) long with 255 = ignore, ``name``, ``orig_size``.
Masks are loaded only when asked (evaluation, fully supervised training), never for weak training.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from wsss.data.classes import ClassSpec
from wsss.data.io import (
    DataError,
    UnreadableImage,
    check_mask_size,
    check_mask_values,
    fit_side,
    image_size,
    read_image,
    read_mask,
)

log = logging.getLogger("wsss")


@dataclass(frozen=True)
class Item:
    """One image: its name, files and foreground tags (names)."""

    name: str
    image: Path
    mask: Path | None
    tags: tuple[str, ...]


class SegDataset(Dataset):
    """Items + ClassSpec + transform.

    Args:
        items: the images of the split.
        classes: class specification.
        transform: ``TrainTransform`` or ``EvalTransform``.
        load_masks: read masks (evaluation / full supervision); never for weak training.
    """

    def __init__(self, items: list[Item], classes: ClassSpec, transform, load_masks: bool, max_side: int = 0) -> None:
        self.items = items
        self.classes = classes
        self.transform = transform
        self.load_masks = load_masks
        self.max_side = max_side  # images (and masks) with a longer side are read downscaled to it; 0: off
        for it in items:
            for t in it.tags:
                if t not in classes.names:
                    raise DataError(f"{it.image}: unknown tag '{t}' (classes: {', '.join(classes.names)})")
        if load_masks:
            missing = [it for it in items if it.mask is None]
            if missing:
                raise DataError(f"{missing[0].image}: no mask for this image ({len(missing)} images lack masks)")

    def __len__(self) -> int:
        return len(self.items)

    def image_size(self, idx: int) -> tuple[int, int]:
        """Displayed (H, W) of image ``idx`` from its file header (no decode): what evaluation batches by."""
        return fit_side(image_size(self.items[idx].image), self.max_side)

    skip_bad = 0  # training sets it (data.max_bad_images): unreadable images replaced by the next, up to this many
    _bad: frozenset = frozenset()

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """The sample of ``key`` (index, or (index, augmentation seed)); with ``skip_bad`` an image that fails to
        decode (changed since the start-up check) is replaced by the next one, with a warning naming it."""
        idx, seed = key if isinstance(key, tuple) else (key, idx_seed(key))
        for _ in range(len(self.items)):  # every image unreadable: stop after one round, not loop for ever
            try:
                return self._sample(idx, seed)
            except UnreadableImage as e:  # decode failures only: a mask with wrong values is the data's error
                if not self.skip_bad:
                    raise
                self._bad = self._bad | {self.items[idx].name}
                if len(self._bad) > self.skip_bad:
                    raise DataError(f"{e} ({len(self._bad)} unreadable images, over data.max_bad_images "
                                    f"{self.skip_bad})") from None  # fmt: skip
                log.warning("%s: skipped, the next image is used instead (%d unreadable in this loader process, at "
                            "most data.max_bad_images %d)", e, len(self._bad), self.skip_bad)  # fmt: skip
                idx = (idx + 1) % len(self.items)
        raise DataError(f"{self.items[idx].image.parent}: none of the {len(self.items)} images could be read")

    def _sample(self, idx: int, seed: int) -> dict:
        it = self.items[idx]
        img = read_image(it.image, self.max_side)
        mask = self._mask(it, img.shape[:2]) if self.load_masks else None
        image, m, valid = self.transform(img, mask, np.random.default_rng(seed))
        out = {
            "image": image,
            "tags": torch.from_numpy(self.classes.multi_hot(list(it.tags))),
            "valid": valid,
            "name": it.name,
            "orig_size": torch.tensor(img.shape[:2]),
            "index": idx,
        }
        if m is not None:
            out["mask"] = m
        return out

    def _mask(self, it: Item, hw: tuple[int, int]) -> np.ndarray:
        """(H, W) mask of ``it`` at the size its image was read at: a mask at the file's full size is
        downscaled (nearest) when ``max_side`` shrank the image; one already at the read size (pseudo
        labels exported under the same max_side) is taken as it is. Values must be class indices or 255."""
        path = it.mask
        if path is None:  # refused when the dataset was made with load_masks; kept for items changed since
            raise DataError(f"{it.image}: no mask for this image")
        if not self.max_side:
            m = read_mask(path, hw)
        else:
            m = read_mask(path)  # decoded once: this runs for every training sample
            if m.shape != hw:
                check_mask_size(path, m.shape, image_size(it.image))  # neither size: the message names both
                m = np.asarray(Image.fromarray(m).resize((hw[1], hw[0]), Image.Resampling.NEAREST))
        check_mask_values(path, m, self.classes.K, self.classes.ignore_index)
        return m


def idx_seed(idx: int) -> int:
    """Deterministic seed for a sample read outside a training stream."""
    return 1_000_003 * idx + 17


def data_root(explicit: str, dataset: str) -> Path:
    """The dataset root: the config's value, else ``$WSSS_DATA/<dataset>``; a missing root is an error."""
    if explicit:
        root = Path(explicit).expanduser()
    elif os.environ.get("WSSS_DATA"):
        root = Path(os.environ["WSSS_DATA"]) / dataset
    else:
        raise DataError(f"no data root for '{dataset}': set data.root (or data.train_root/val_root) or WSSS_DATA")
    if not root.is_dir():
        raise DataError(f"{root}: data root does not exist")
    return root


def read_list(path: Path) -> list[str]:
    """Names in a split list file (one per line; first column if several)."""
    if not path.is_file():
        raise DataError(f"{path}: split list not found")
    return [ln.split()[0] for ln in path.read_text().splitlines() if ln.strip()]
