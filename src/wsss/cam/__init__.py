"""CAMs, pseudo labels and their refinement. Importing the package registers the CRF backends (``dense``,
``torch``) with CRF."""

from wsss.cam import crf  # noqa: F401
