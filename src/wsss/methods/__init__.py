"""Methods: each file registers one method with METHODS."""

from wsss.methods import cpf_cte, fsr, fully_supervised, rca, stcl, toco, wsfcn  # noqa: F401
from wsss.methods.base import Method, StepOutput

__all__ = ["Method", "StepOutput"]
