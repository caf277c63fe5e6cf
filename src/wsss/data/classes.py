"""Class specifications: names, background handling, ignore index and palette.

Label indices: with a background class, 0 is background and foreground class ``c`` (0-based in
``names``) is ``c + 1``; without one, foreground class ``c`` is ``c``. Code asks ``fg_offset`` and
``K`` instead of writing ``num_classes - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IGNORE_INDEX = 255

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip


def voc_palette(n: int = 256) -> np.ndarray:
    """The standard PASCAL VOC colour map: (n, 3) uint8, index 255 included when n = 256."""
    pal = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


@dataclass(frozen=True)
class ClassSpec:
    """Foreground class names, whether a background class exists, ignore index and palette.

    Args:
        names: foreground class names, in label order.
        background: True when label 0 is a background class.
        ignore_index: label value that evaluation and losses skip.
    """

    names: tuple[str, ...]
    background: bool = True
    ignore_index: int = IGNORE_INDEX
    palette: tuple[int, ...] = field(default_factory=lambda: tuple(voc_palette().flatten().tolist()))

    @property
    def num_fg(self) -> int:
        """Number of foreground classes (the CAM/classifier width)."""
        return len(self.names)

    @property
    def fg_offset(self) -> int:
        """Label index of foreground class 0."""
        return 1 if self.background else 0

    @property
    def K(self) -> int:  # noqa: N802 - the field's usual symbol
        """Number of segmentation classes (seg head width, confusion matrix size)."""
        return self.num_fg + self.fg_offset

    @property
    def seg_names(self) -> tuple[str, ...]:
        """Names of all K segmentation classes, in label order."""
        return (("background",) if self.background else ()) + tuple(self.names)

    def index(self, name: str) -> int:
        """Foreground index (0-based) of a tag; unknown tags raise KeyError naming the tag."""
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"unknown tag '{name}'") from None

    def multi_hot(self, tags: list[str]) -> np.ndarray:
        """(num_fg,) float32 multi-hot vector of tag names."""
        v = np.zeros(self.num_fg, dtype=np.float32)
        for t in tags:
            v[self.index(t)] = 1.0
        return v

    def tags_from_mask(self, mask: np.ndarray) -> list[str]:
        """Foreground tag names present in a label mask (H, W) of label indices."""
        vals = np.unique(mask)
        fg = [int(v) - self.fg_offset for v in vals if v != self.ignore_index and v >= self.fg_offset]
        return [self.names[v] for v in fg if v < self.num_fg]


VOC = ClassSpec(VOC_CLASSES)
COCO = ClassSpec(COCO_CLASSES)
