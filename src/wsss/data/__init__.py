"""Datasets, class specifications, transforms and the demo-data generator.

The dataset modules (voc, folder) register themselves when the registry first loads them, so
importing this package stays light (no torch).
"""

from wsss.data.classes import COCO, VOC, ClassSpec
from wsss.data.io import DataError

__all__ = ["COCO", "VOC", "ClassSpec", "DataError"]
