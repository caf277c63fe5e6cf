"""SBD (Hariharan et al. 2011) -> VOC's ``SegmentationClassAug``: the 10,582-image train_aug masks.

SBD (``benchmark.tgz``: ``benchmark_RELEASE/dataset/{cls/*.mat, train.txt, val.txt}``) labels 11,355 VOC
images; each ``cls/<name>.mat`` holds a struct ``GTcls`` whose ``Segmentation`` is an (H, W) array of
class indices 0..20 (VOC's order, no void border). ``SegmentationClassAug`` is the union of those masks
and VOC 2012's own ``SegmentationClass`` (2,913 train + val), VOC's mask taking precedence where both
exist (it is the official one, with its void borders); train_aug is that union minus VOC's val list.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from wsss.data.classes import VOC, voc_palette
from wsss.data.io import DataError, read_mask, write_mask

log = logging.getLogger(__name__)


def sbd_dataset_dir(path: Path) -> Path:
    """The folder holding ``cls/`` for an SBD path given as benchmark_RELEASE, its dataset/ or its cls/."""
    for cand in (path, path / "dataset", path / "benchmark_RELEASE" / "dataset"):
        if (cand / "cls").is_dir():
            return cand
    if path.name == "cls" and path.is_dir():
        return path.parent
    raise DataError(f"{path}: no SBD cls/ folder (expected benchmark_RELEASE/dataset/cls/*.mat from benchmark.tgz)")


def read_sbd_mat(path: Path) -> np.ndarray:
    """(H, W) uint8 class indices 0..20 of one SBD ``cls/<name>.mat``; a bad file raises DataError."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError("scipy is needed to read SBD's .mat files: pip install 'wsss[voc]'") from None
    try:
        gt = loadmat(str(path), squeeze_me=True, struct_as_record=False)["GTcls"]
        seg = np.asarray(gt.Segmentation)
    except Exception as e:  # scipy raises several types for damaged or foreign files
        raise DataError(f"{path}: not an SBD class mask ({type(e).__name__}: {e})") from None
    if seg.ndim != 2 or seg.size == 0 or seg.min() < 0 or seg.max() > VOC.num_fg:
        lo, hi = (seg.min(), seg.max()) if seg.size else ("-", "-")
        raise DataError(f"{path}: Segmentation must be a 2-D array of classes 0..{VOC.num_fg}, got shape "
                        f"{seg.shape} with values {lo}..{hi}")  # fmt: skip
    return seg.astype(np.uint8)


def convert_sbd(root: Path, sbd: Path, progress=lambda it, total, desc: it) -> dict:
    """Write ``root/SegmentationClassAug/<name>.png`` for every SBD and VOC mask (VOC's where both exist).

    Existing PNGs in SegmentationClassAug are kept, never replaced, so an interrupted conversion resumes and
    a folder the user made is left as it is; names without a JPEGImages file are skipped. Every .mat header
    is checked before the first write. Returns counts: ``sbd`` masks read, ``voc`` masks copied, ``kept``
    already present, ``missing_images`` names skipped.
    """
    try:
        from scipy.io import whosmat
    except ImportError:
        raise DataError("scipy is needed to read SBD's .mat files: pip install 'wsss[voc]'") from None
    ds = sbd_dataset_dir(sbd)
    mats = sorted((ds / "cls").glob("*.mat"))
    if not mats:
        raise DataError(f"{ds / 'cls'}: no .mat files")
    for m in progress(mats, len(mats), "check SBD headers"):  # a foreign or damaged file fails before any write
        try:
            ok = any(name == "GTcls" for name, _, _ in whosmat(str(m)))
        except Exception as e:  # scipy raises several types for damaged or foreign files
            raise DataError(f"{m}: not an SBD class mask ({type(e).__name__}: {e})") from None
        if not ok:
            raise DataError(f"{m}: not an SBD class mask (no GTcls struct)")
    out = root / "SegmentationClassAug"
    out.mkdir(exist_ok=True)
    voc_dir = root / "SegmentationClass"
    voc_names = {p.stem for p in voc_dir.glob("*.png")} if voc_dir.is_dir() else set()
    palette = voc_palette().flatten().tolist()
    counts = {"sbd": 0, "voc": 0, "kept": 0, "missing_images": 0}
    names = sorted({m.stem for m in mats} | voc_names)
    mat_of = {m.stem: m for m in mats}
    missing = []
    for name in progress(names, len(names), "SegmentationClassAug"):
        dst = out / f"{name}.png"
        if not (root / "JPEGImages" / f"{name}.jpg").is_file():  # a mask without its image trains nothing
            missing.append(name)
            continue
        if dst.exists() or dst.is_symlink():  # a dangling link is the user's too
            counts["kept"] += 1
            continue
        if name in voc_names:
            write_mask(dst, read_mask(voc_dir / f"{name}.png"), palette)
            counts["voc"] += 1
        else:
            write_mask(dst, read_sbd_mat(mat_of[name]), palette)
            counts["sbd"] += 1
    counts["missing_images"] = len(missing)
    if missing:
        log.warning("%d SBD/VOC masks skipped: no image in %s (e.g. %s.jpg; is %s VOC 2012?)", len(missing),
                    root / "JPEGImages", missing[0], root)  # fmt: skip
    return counts
