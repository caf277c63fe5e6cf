"""Write predicted masks as palette PNGs (``wsss predict``): new images or a dataset split."""

from __future__ import annotations

from pathlib import Path

import torch

from wsss.data.base import Item, SegDataset
from wsss.data.classes import ClassSpec
from wsss.data.io import DataError, write_mask
from wsss.data.transforms import EvalTransform
from wsss.evaluation.inference import predict_probs

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def image_items(inputs: list[str]) -> list[Item]:
    """Items (no tags, no masks) for image files and the images directly inside directories."""
    items = []
    for inp in inputs:
        p = Path(inp)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise DataError(f"{p}: no images ({', '.join(IMAGE_SUFFIXES)}) in this directory")
        elif p.is_file():
            files = [p]
        else:
            raise DataError(f"{p}: no such image file or directory")
        items += [Item(f.stem, f, None, ()) for f in files]
    names = [it.name for it in items]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:  # two outputs would overwrite each other
        raise DataError(f"{dup}: two input images share this name; predict them in separate runs")
    return items


def image_dataset(inputs: list[str], classes: ClassSpec) -> SegDataset:
    """A dataset over plain image files for prediction."""
    return SegDataset(image_items(inputs), classes, EvalTransform(), load_masks=False)


@torch.no_grad()
def write_predictions(method, loader, classes: ClassSpec, ecfg, device, out_dir: Path, progress=None) -> int:
    """Predict each image of ``loader`` and write ``out_dir/<name>.png`` (palette, atomic).

    Masks hold indices into ``classes.seg_names`` at the image's original size. Returns the count.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    was_training = method.training
    method.eval()
    n = 0
    for batch in progress(loader) if progress else loader:
        probs = predict_probs(method, batch["image"].to(device), ecfg)
        pred = probs.max(1).indices.to(torch.uint8).cpu().numpy()
        for name, m in zip(batch["name"], pred):
            write_mask(out_dir / f"{Path(name).name}.png", m, classes.palette)
            n += 1
    method.train(was_training)
    return n
