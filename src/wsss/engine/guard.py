"""The non-finite guard: an optimizer step whose loss or gradients hold NaN/Inf is skipped, not taken.

A single bad batch (a corrupt image, an overflow) then costs one step instead of the run's weights;
``train.nan_patience`` bad steps in a row stop the run with one line, before anything non-finite is
written to a checkpoint.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

from wsss.utils import dist

log = logging.getLogger("wsss")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stayed non-finite); the message is one line."""


# what allocator failures say when they come as a plain RuntimeError (cuBLAS/cuDNN handles, the CUDA runtime,
# Apple's MPS, the CPU allocator) rather than as torch.OutOfMemoryError
_OOM_TEXT = ("DefaultCPUAllocator: can't allocate memory", "CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED",
             "CUDNN_STATUS_ALLOC_FAILED", "MPS backend out of memory")  # fmt: skip


def is_out_of_memory(e: BaseException) -> bool:
    """True for an allocator failure: ``torch.OutOfMemoryError`` or a RuntimeError with one of their messages."""
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and any(t in str(e) for t in _OOM_TEXT)
    )


def out_of_memory_advice(it: int, device: torch.device, micro: int, accum: int, world: int, crop: int,
                         amp: torch.dtype | None) -> str:  # fmt: skip
    """The one-line error for an out-of-memory training step at 0-based iteration ``it``: what was being run
    (images per forward, crop, how the batch is made up) and what lowers the memory without changing the
    recipe's batch (a smaller ``train.micro_batch`` that divides the per-process batch), or, at one image
    per forward, what does change it. ``amp``: the autocast dtype the step ran under (None: full precision)."""
    precision = {None: "full precision", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[amp]
    what = (f"iteration {it + 1}: out of {device.type.upper()} memory in a training step of {micro} image(s) per "
            f"forward at crop {crop} px (train.batch_size {micro * accum * world} = micro_batch {micro} x {accum} "
            f"accumulation step(s) x {world} process(es), {precision})")  # fmt: skip
    if micro > 1:
        smaller = max(d for d in range(1, micro) if (micro * accum) % d == 0)  # the trainer refuses non-divisors
        return (f"{what}: set train.micro_batch {smaller} (gradients accumulate over more forwards; the batch "
                "and the recipe stay the same)")  # fmt: skip
    fix = "lower data.crop_size" if amp is not None else "set train.amp bf16 or lower data.crop_size"
    return f"{what}: already one image per forward; {fix} (this changes the recipe), or a device with more memory"


def inference_out_of_memory_advice(device: str, scales=None, flip: bool = False, batch_size: int = 0,
                                   window: int = 0) -> str:  # fmt: skip
    """The one-line error for running out of memory in whole-image inference (evaluation, predict, pseudo labels),
    naming what was asked when known, and the settings that lower its memory."""
    asked = "" if scales is None else (f" (eval.batch_size {batch_size}, eval.scales {list(scales)}, eval.flip "
                                       f"{str(flip).lower()}, eval.window {window})")  # fmt: skip
    return (
        f"out of {device.upper()} memory in whole-image inference{asked}: set eval.window 448 (seg logits from "
        "overlapping windows), eval.batch_size 1, fewer eval.scales, or data.max_side 1024 for large images"
    )


class NonFiniteGuard:
    """Decides, once per optimizer step and identically on every process, whether the step is taken.

    Args:
        patience: consecutive skipped steps after which :meth:`check` raises TrainingError.
    """

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.bad_in_row = 0
        self.skipped = 0

    def check(self, it: int, loss_ok: bool, grad_norm: float | None, logs: dict[str, float],
              names: list[str], last_ckpt: Callable[[], str]) -> bool:  # fmt: skip
        """True when step ``it`` (0-based) may be taken. ``loss_ok``: every micro-batch loss was finite on
        this process; ``grad_norm``: the gradients' total norm (None: not checked here, e.g. the fp16 scaler
        skips inf gradients itself); ``logs``/``names``: this step's losses and images, for the warning;
        ``last_ckpt()``: names the last checkpoint in the error when patience runs out.

        Raises:
            TrainingError: ``patience`` steps in a row were bad.
        """
        bad = not loss_ok or (grad_norm is not None and not math.isfinite(grad_norm))
        if dist.world_size() > 1:  # one rank's NaN stops the step on every rank (they must stay in lockstep)
            bad = bool(dist.all_reduce_sum(torch.tensor([float(bad)], device=_reduce_device())).item())
        if not bad:
            self.bad_in_row = 0
            return True
        self.bad_in_row += 1
        self.skipped += 1
        losses = ", ".join(f"{k} {v:.4g}" for k, v in logs.items() if not math.isfinite(v)) or "all finite here"
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        grad = "" if grad_norm is None else f"; gradient norm {float(grad_norm):.4g}"
        log.warning("iteration %d: non-finite loss or gradient, step skipped (%d in a row, %d in all); losses %s%s; "
                    "images %s", it + 1, self.bad_in_row, self.skipped, losses, grad, shown or "-")  # fmt: skip
        if self.bad_in_row >= self.patience:
            raise TrainingError(
                f"iteration {it + 1}: {self.bad_in_row} optimizer steps in a row had a non-finite loss or gradient "
                f"(losses {losses}{grad}); stopped, nothing non-finite was saved; last checkpoint: {last_ckpt()}; "
                "lower optim.lr or set optim.grad_clip"
            )
        return False


def _reduce_device() -> torch.device:
    import torch.distributed as tdist

    return torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else torch.device("cpu")


def params_finite(module: torch.nn.Module) -> bool:
    """True when every parameter and floating buffer of ``module`` is finite (one host sync)."""
    flags = [torch.isfinite(t).all() for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True
