"""Datasets, class specifications, transforms and the demo-data generator."""

from wsss.data import folder, voc  # noqa: F401  (register the built-in datasets)
from wsss.data.classes import COCO, VOC, ClassSpec
from wsss.data.io import DataError

__all__ = ["COCO", "VOC", "ClassSpec", "DataError"]
