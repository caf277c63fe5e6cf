"""Image and label-mask IO with one-line errors that name the file.

Masks are palette (or single-channel) PNGs of label indices, read with Pillow without any colour
conversion: ``convert('L')`` or OpenCV would map indices to luminance or colours. Every read applies
the file's EXIF orientation, so images and masks are used as a photo viewer shows them (a phone photo
stored 4032 x 3024 with orientation 6 is a 3024 x 4032 portrait).
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from wsss.utils.files import atomic_write

log = logging.getLogger(__name__)
_warned: set[str] = set()
_ORIENTATION = 0x0112  # EXIF tag
_SWAPS = (5, 6, 7, 8)  # orientations that turn the picture by 90 degrees (transpose, rotate, transverse)


WIDE_MODES = ("I;16", "I;16B", "I;16L", "I", "F")  # 16/32-bit: convert("RGB") clips them to white
# what Pillow's decoders raise on a damaged file besides OSError (found by tests/integration/test_fuzz.py: a
# bit-flipped TIFF header gives ValueError "Invalid dimensions", a missing tag TypeError or KeyError)
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError, KeyError, IndexError,
                  EOFError, struct.error, ZeroDivisionError, OverflowError)  # fmt: skip


def _decoder_failed(e: BaseException) -> bool:
    """True when ``e`` (one of _DECODE_ERRORS) means the file is damaged: an I/O error, or an error raised inside
    Pillow. A ValueError or TypeError raised by our own code (a programming error) is not a bad file."""
    if isinstance(e, (OSError, UnidentifiedImageError, SyntaxError, EOFError, struct.error)):
        return True
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and f"{os.sep}PIL{os.sep}" in tb.tb_frame.f_code.co_filename


def orientation(im: Image.Image) -> int:
    """The EXIF orientation (1-8) of an open image; 1 when it has none or it is unreadable."""
    try:
        o = int(im.getexif().get(_ORIENTATION, 1))
    except Exception:  # a malformed EXIF block: Pillow raises assorted errors; the pixels are still usable
        return 1
    return o if 1 <= o <= 8 else 1


def displayed_size(im: Image.Image) -> tuple[int, int]:
    """(H, W) of an open image as displayed (after its EXIF orientation), read from the header only."""
    return (im.width, im.height) if orientation(im) in _SWAPS else (im.height, im.width)


def _upright(im: Image.Image) -> Image.Image:
    """``im`` turned to its EXIF orientation (pixel values and mode unchanged)."""
    return ImageOps.exif_transpose(im) if orientation(im) != 1 else im


def image_size(path: str | Path) -> tuple[int, int]:
    """Displayed (H, W) of an image file from its header (no decode); DataError when it cannot be opened."""
    return image_header(path)[1]


def image_header(path: str | Path, what: str = "image") -> tuple[str, tuple[int, int]]:
    """(mode, displayed (H, W)) of an image file from its header (no decode); DataError naming ``path``
    (as an ``what`` file) when it is missing, unreadable or declares too many pixels."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            return im.mode, displayed_size(im)
    except FileNotFoundError:
        raise DataError(f"{path}: {what} file is missing") from None
    except Image.DecompressionBombError as e:
        raise DataError(_bomb(path, e)) from None
    except DataError:
        raise
    except _DECODE_ERRORS as e:
        if not _decoder_failed(e):
            raise
        raise DataError(f"{path}: corrupt or unreadable {what} ({type(e).__name__}: {e})") from None


class DataError(ValueError):
    """Bad input data; the message names the file and the problem."""


class UnreadableImage(DataError):
    """An image file that is missing or does not decode (training may skip it: data.max_bad_images)."""


def _bomb(path: Path, e: Exception) -> str:
    """The one-line message for an image whose header declares more pixels than Pillow's safety limit."""
    m = re.search(r"\((\d+) pixels\)", str(e))
    count = f"{int(m.group(1)) / 1e6:.0f} M pixels" if m else "too many pixels"
    limit = 2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6  # Pillow refuses at twice its warning threshold
    return (f"{path}: its header declares {count}, over Pillow's limit of {limit:.0f} M (a decompression bomb, or a "
            "huge scan: downscale it before use)")  # fmt: skip


def inspect_image(path: str | Path) -> tuple[tuple[str, str] | None, tuple[int, int] | None]:
    """(problem, displayed (H, W) when the file decodes), one open and one decode. The problem is None when the
    image is fine, else (severity, message): "error" means the file cannot be used, "warning" that it is
    converted on read."""
    path = Path(path)
    if not path.is_file():
        return ("error", f"{path}: image file is missing"), None
    try:
        with Image.open(path) as im:
            mode, size, turn = im.mode, displayed_size(im), orientation(im)
            im.load()
    except Image.DecompressionBombError as e:
        return ("error", _bomb(path, e)), None
    except DataError:
        raise
    except _DECODE_ERRORS as e:
        if not _decoder_failed(e):
            raise
        return ("error", f"{path}: corrupt or unreadable image ({type(e).__name__}: {e})"), None
    prob = _mode_problem(path, mode)
    if prob is None and turn != 1:  # masks drawn on the stored pixels would not fit: say which way it is read
        prob = ("warning", f"{path}: EXIF orientation {turn}: used as displayed, {size[0]}x{size[1]} (height x width)")
    return prob, size


def _mode_problem(path: Path, mode: str) -> tuple[str, str] | None:
    if mode in WIDE_MODES:
        return "error", f"{path}: {mode} (16/32-bit) image; convert it to 8-bit RGB"
    if mode in ("RGBA", "LA", "PA"):
        return "warning", f"{path}: image has an alpha channel ({mode}); alpha is dropped"
    if mode in ("L", "1", "P"):
        return "warning", f"{path}: {mode} (grayscale/palette) image; converted to RGB"
    if mode not in ("RGB", "CMYK", "YCbCr"):
        return "error", f"{path}: unsupported image mode {mode}"
    return None


def fit_side(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(H, W) scaled so that its longer side is at most ``max_side`` (0: unchanged), each side at least 1."""
    h, w = size
    if not max_side or max(h, w) <= max_side:
        return h, w
    s = max_side / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def read_image(path: str | Path, max_side: int = 0) -> np.ndarray:
    """Read an RGB image as (H, W, 3) uint8, as displayed (EXIF orientation applied); grayscale and RGBA
    are converted with a warning once. ``max_side`` > 0: a larger image is downscaled (antialiased) to
    :func:`fit_side`; a JPEG is then decoded at a reduced scale already (PIL's draft), which makes huge
    photos cheap to read."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode in WIDE_MODES:
                raise DataError(f"{path}: {mode} (16/32-bit) image; convert it to 8-bit RGB")
            if mode != "RGB" and str(path) not in _warned:
                _warned.add(str(path))
                log.warning("%s: %s image converted to RGB", path, mode)
            size = displayed_size(im)
            target = fit_side(size, max_side)
            if target == size:
                return np.asarray(_upright(im).convert("RGB"))
            swap = orientation(im) in _SWAPS  # draft sizes are in stored (unrotated) pixels
            if im.format == "JPEG":
                im.draft("RGB", (target[0], target[1]) if swap else (target[1], target[0]))
            up = _upright(im).convert("RGB")
            return np.asarray(up.resize((target[1], target[0]), Image.Resampling.BILINEAR, reducing_gap=3.0))
    except FileNotFoundError:
        raise UnreadableImage(f"{path}: image file is missing") from None
    except Image.DecompressionBombError as e:
        raise DataError(_bomb(path, e)) from None
    except DataError:
        raise
    except _DECODE_ERRORS as e:
        if not _decoder_failed(e):
            raise
        raise UnreadableImage(f"{path}: corrupt or unreadable image ({type(e).__name__}: {e})") from None


def read_mask(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a label mask as (H, W) uint8 indices, never colour-converted, as displayed (EXIF orientation
    applied, like its image).

    Args:
        path: palette or single-channel PNG.
        size: expected displayed (H, W) (the image's); a mismatch raises DataError.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            check_mask_mode(path, im.mode)
            arr = np.asarray(_upright(im))
    except FileNotFoundError:
        raise DataError(f"{path}: mask file is missing") from None
    except Image.DecompressionBombError as e:
        raise DataError(_bomb(path, e)) from None
    except DataError:
        raise
    except _DECODE_ERRORS as e:
        if not _decoder_failed(e):
            raise
        raise DataError(f"{path}: corrupt or unreadable mask ({type(e).__name__}: {e})") from None
    if size is not None:
        check_mask_size(path, arr.shape, size)
    return arr


def check_mask_mode(path: str | Path, mode: str) -> None:
    """Raise DataError unless the PIL ``mode`` of the mask at ``path`` holds label indices (palette or grey)."""
    if mode not in ("P", "L"):
        raise DataError(f"{path}: mask is {mode}; expected a palette or single-channel PNG of label indices")


def check_mask_size(path: str | Path, mask_hw: tuple[int, int], size: tuple[int, int]) -> None:
    """Raise DataError naming both sizes unless the mask's (H, W) ``mask_hw`` read from ``path`` is its
    image's (H, W) ``size``."""
    if tuple(mask_hw) != tuple(size):
        raise DataError(
            f"{path}: mask is {mask_hw[0]}x{mask_hw[1]} but its image is {size[0]}x{size[1]} "
            "(height x width, as displayed: EXIF orientation applied)"
        )


def check_mask_values(path: str | Path, mask: np.ndarray, num_classes: int, ignore: int = 255) -> None:
    """Raise DataError naming the values of ``mask`` (H, W) that are neither a class index below
    ``num_classes`` nor ``ignore`` (a mask drawn for another class list, or saved with colours)."""
    bad = (mask >= num_classes) & (mask != ignore)
    if bad.any():
        vals = np.unique(mask[bad])
        shown = ", ".join(str(int(v)) for v in vals[:6]) + (" ..." if len(vals) > 6 else "")
        raise DataError(f"{path}: mask values {shown} are not class indices (0-{num_classes - 1}, {ignore} ignored): "
                        f"{int(bad.sum())} pixels; a mask of another class list, or one saved in colour")  # fmt: skip


_NUM = r"(?:-?\d[\d.eE+-]*|NaN|-?Infinity)"
# indent=2 puts each element on its own line; strings hold no raw newline, so a bracket inside one never matches
_NUMBER_LIST = re.compile(r"\[\n\s*(" + _NUM + r"(?:,\n\s*" + _NUM + r")*)\n\s*\]")


def dumps_results(obj) -> str:
    """JSON of evaluation results, indented, with every list of plain numbers on one line (a K x K
    confusion matrix is K lines, not K^2)."""
    text = json.dumps(obj, indent=2)
    return _NUMBER_LIST.sub(lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]", text)


def ensure_writable(folder: str | Path) -> Path:
    """Create ``folder`` (and its parents) and check that files can be made in it, before any long work;
    a DataError naming it otherwise (read-only, a file in the way, no permission)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".wsss-write-check.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise DataError(f"{e.filename or folder}: cannot write output there ({why})") from None
    return folder


def write_mask(path: str | Path, mask: np.ndarray, palette: tuple[int, ...] | list[int]) -> None:
    """Write (H, W) label indices as a palette PNG, atomically."""
    im = Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="P")
    im.putpalette(list(palette)[: 256 * 3])
    atomic_write(path, lambda p: im.save(p, format="PNG"))
