"""Backbones and heads. Importing the package registers the backbone families (``vit``, ``cnn``) with
BACKBONES; timm itself is imported only when a backbone is built."""

from wsss.models import backbone, cnn  # noqa: F401
