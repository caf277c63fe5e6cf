"""``wsss predict``: masks as palette PNGs, optional overlays, probabilities and CAMs, and a
``predictions.json`` of the classes found, for new images or a dataset split."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from wsss.data.base import Item, SegDataset
from wsss.data.classes import ClassSpec
from wsss.data.io import DataError, write_mask
from wsss.data.transforms import EvalTransform, denormalize
from wsss.evaluation.outputs import guard_outputs, planned_records, write_index
from wsss.utils.files import atomic_write

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
INDEX = "predictions.json"


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


@dataclass(frozen=True)
class PredictOptions:
    """What ``wsss predict`` writes per image besides ``<name>.png``, and how it treats large images."""

    overlay: bool = False  # <name>_overlay.png: image | image under the mask, legend of classes and shares
    save_probs: bool = False  # <name>_probs.npy: (K, H, W) float16 class probabilities
    save_cams: bool = False  # <name>_cams.npy: (C, H, W) float16 CAMs in [0, 1]
    max_side: int = 0  # the network sees images downscaled to this longer side (0: as they are)
    overwrite: bool = False  # replace outputs that an earlier `wsss predict` listed in this folder's index


def output_files(name: str, opts: PredictOptions) -> list[str]:
    """The file names ``wsss predict`` writes for the image ``name`` under ``opts``."""
    files = [f"{name}.png"]
    files += [f"{name}_overlay.png"] if opts.overlay else []
    files += [f"{name}_probs.npy"] if opts.save_probs else []
    return files + ([f"{name}_cams.npy"] if opts.save_cams else [])


def planned_outputs(items: list[Item], opts: PredictOptions) -> dict[str, list[str]]:
    """Image name -> the files :func:`output_files` gives it."""
    return {Path(it.name).name: output_files(Path(it.name).name, opts) for it in items}


def check_outputs(items: list[Item], out_dir: Path, opts: PredictOptions) -> list[dict]:
    """Raise DataError before any work when an output would replace an input image, or a file this
    command did not write (:func:`wsss.evaluation.outputs.guard_outputs`). Returns the earlier index's
    records (kept in the new index for the images this run does not predict)."""
    inputs = {it.image.resolve() for it in items}
    return guard_outputs(out_dir, planned_outputs(items, opts), inputs, INDEX, opts.overwrite,
                         "wsss predict").get("images", [])  # fmt: skip


def _save_png(path: Path, rgb: np.ndarray) -> None:
    im = Image.fromarray(rgb)
    atomic_write(path, lambda p: im.save(p, format="PNG"))  # the format: the temporary name has no .png


def _save_npy(path: Path, arr: np.ndarray) -> None:
    def write(p):
        with open(p, "wb") as f:  # a file object: np.save would append .npy to the temporary name
            np.save(f, arr.astype(np.float16))

    atomic_write(path, write)


@torch.no_grad()
def write_predictions(method, loader, classes: ClassSpec, ecfg, device, out_dir: Path, progress=None,
                      opts: PredictOptions = PredictOptions(), meta: dict | None = None,
                      earlier: Sequence[dict] = ()) -> list[dict]:  # fmt: skip
    """Predict each image of ``loader`` (batches of one) and write its files (:func:`output_files`, atomic)
    and ``out_dir/predictions.json``: per image its name, size (H, W), the foreground classes found by
    decreasing share, every present class's pixel share and the files written. Masks hold indices into
    ``classes.seg_names`` at the image's displayed size. The index is written first with every planned
    file (so a crash leaves none unlisted) and ``earlier``'s records of other images are kept in it.
    Returns the per-image records."""
    from wsss.evaluation.inference import cams_at, probs_at, summarize_mask
    from wsss.viz.overlay import overlay_panel

    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {**(meta or {}), "classes": list(classes.seg_names)}
    write_index(out_dir / INDEX, meta, planned_records(planned_outputs(loader.dataset.items, opts)), earlier)
    was_training = method.training
    method.eval()
    records = []
    for batch in progress(loader) if progress else loader:
        x = batch["image"].to(device)
        probs = probs_at(method, x, ecfg, opts.max_side)
        cams = cams_at(method, x, opts.max_side) if opts.save_cams else None
        for i, name in enumerate(batch["name"]):
            name = Path(name).name
            mask = probs[i].argmax(0).to(torch.uint8).cpu().numpy()
            found, shares = summarize_mask(mask, classes)
            write_mask(out_dir / f"{name}.png", mask, classes.palette)
            if opts.overlay:
                rgb = (denormalize(x[i : i + 1].float())[0].clamp(0, 1) * 255).round().byte()
                panel = overlay_panel(rgb.permute(1, 2, 0).cpu().numpy(), mask, shares, classes.seg_names,
                                      classes.palette)  # fmt: skip
                _save_png(out_dir / f"{name}_overlay.png", panel)
            if opts.save_probs:
                _save_npy(out_dir / f"{name}_probs.npy", probs[i].cpu().numpy())
            if cams is not None:
                _save_npy(out_dir / f"{name}_cams.npy", cams[i].cpu().numpy())
            records.append({"name": name, "size": list(mask.shape), "found": list(found), "shares": shares,
                            "outputs": output_files(name, opts)})  # fmt: skip
    method.train(was_training)
    write_index(out_dir / INDEX, meta, records, earlier)
    return records
