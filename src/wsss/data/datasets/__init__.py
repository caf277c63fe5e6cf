"""The built-in datasets, each registering itself with DATASETS on import: the VOC layout (``voc``, ``coco``,
``demo``) and tagged folders (``folder``). Importing this package imports torch; ``wsss.data`` alone does not."""

from wsss.data.datasets import folder, voc  # noqa: F401
