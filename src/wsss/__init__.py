"""wsss: weakly supervised semantic segmentation from image-level labels."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``wsss.load``, ``wsss.Segmenter``, ``wsss.Prediction`` on first use (``import wsss`` stays light)."""
    if name in ("load", "Segmenter", "Prediction"):
        from wsss import api

        return getattr(api, name)
    raise AttributeError(f"module 'wsss' has no attribute {name!r}")
