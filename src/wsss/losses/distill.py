"""DINO-style self-distillation between an EMA teacher and the student (FSR's losses)."""

from __future__ import annotations

import torch
import torch.nn as nn


class CenteredDistill(nn.Module):
    """Teacher targets ``softmax((t - center) / tau_t)``, student ``log_softmax(s / tau_s)``; the loss is
    ``KL(p_t || p_s)`` per row: the same gradient for the student as FSR's cross-entropy ``H(p_t, p_s)``
    (the teacher's entropy is a constant), and 0 exactly when the two distributions agree.

    ``tau_t`` rises linearly from ``teacher_temp`` to ``teacher_temp_end`` over ``warmup`` iterations.
    The centre is an EMA (``center_momentum``) of the teacher outputs' mean; statistics are collected
    during the step (all micro-batches) and applied by :meth:`update_center` after it, summed over
    processes, so the update does not depend on how the batch was split.

    Args:
        dim: K logits.
    """

    center: torch.Tensor  # (1, K) buffer (register_buffer), declared for the type checker

    def __init__(
        self, dim: int, student_temp: float = 0.1, teacher_temp: float = 0.04, teacher_temp_end: float = 0.07,
        warmup: int = 0, center_momentum: float = 0.9,
    ) -> None:  # fmt: skip
        super().__init__()
        self.student_temp, self.t0, self.t1, self.warmup = student_temp, teacher_temp, teacher_temp_end, warmup
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, dim))
        self._sum: torch.Tensor | None = None
        self._count = 0

    def teacher_temp(self, it: int) -> float:
        """tau_t at iteration ``it``."""
        if self.warmup <= 0 or it >= self.warmup:
            return self.t1
        return self.t0 + (self.t1 - self.t0) * it / self.warmup

    def forward(
        self, teacher: torch.Tensor, student: torch.Tensor, it: int, center_rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-row KL (M,) between teacher logits (M, K) (no gradient) and student logits (M, K).

        ``center_rows`` (R, K): the teacher rows the centre is estimated from, when those are more than
        the rows distilled (FSR: every patch token of the view, the loss only on the masked ones);
        default ``teacher``."""
        t = teacher.detach().float()
        log_pt = torch.log_softmax((t - self.center) / self.teacher_temp(it), -1)
        log_ps = torch.log_softmax(student.float() / self.student_temp, -1)
        rows = t if center_rows is None else center_rows.detach().float()
        if self.training and rows.shape[0]:
            s = rows.sum(0, keepdim=True)
            self._sum = s if self._sum is None else self._sum + s
            self._count += rows.shape[0]
        return (log_pt.exp() * (log_pt - log_ps)).sum(-1)

    def discard_pending(self) -> None:
        """Drop this step's teacher-row sums (its step was skipped)."""
        self._sum, self._count = None, 0

    @torch.no_grad()
    def update_center(self) -> None:
        """center <- m * center + (1 - m) * mean of this step's teacher rows (all processes)."""
        from wsss.utils import dist

        K = self.center.shape[1]
        s = self._sum if self._sum is not None else torch.zeros(1, K, device=self.center.device)
        both = dist.all_reduce_sum(torch.cat([s.to(self.center), self.center.new_tensor([[float(self._count)]])], 1))
        self._sum, self._count = None, 0
        n = float(both[0, K])
        if n > 0:
            m = self.center_momentum
            self.center.mul_(m).add_(both[:, :K] / n, alpha=1 - m)
