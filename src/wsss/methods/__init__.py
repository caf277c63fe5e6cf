"""Methods: each file registers one method with METHODS."""

from wsss.methods import cpf_cte, fully_supervised, stcl, toco  # noqa: F401
from wsss.methods.base import Method, StepOutput

__all__ = ["Method", "StepOutput"]
