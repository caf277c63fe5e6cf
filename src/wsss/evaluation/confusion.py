"""Confusion matrix over all evaluated pixels of a split (not per image), mIoU and friends.

A class absent from both ground truth and predictions ("never seen") has IoU NaN and is left out of
the mean (the nanmean convention of ToCo and torchmetrics' macro average); a class only predicted
has IoU 0 and counts.
"""

from __future__ import annotations

import torch

from wsss.utils.dist import all_reduce_sum


class ConfusionMatrix:
    """K x K matrix, rows = ground truth, columns = prediction; ``ignore_index`` ground truth skipped.

    A prediction outside [0, K) (e.g. 255 in a pseudo label) is kept in an extra column ``abstain``:
    a miss for its ground-truth class that no predicted class is charged with.

    Args:
        num_classes: K.
        ignore_index: ground-truth value to skip.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.K = num_classes
        self.ignore_index = ignore_index
        self._m = torch.zeros(num_classes, num_classes + 1, dtype=torch.int64)

    @property
    def mat(self) -> torch.Tensor:
        """(K, K) counts of (ground truth, prediction) pairs."""
        return self._m[:, : self.K]

    @property
    def abstain(self) -> torch.Tensor:
        """(K,) pixels per ground-truth class that got no prediction in [0, K)."""
        return self._m[:, self.K]

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add predictions and targets of equal shape (e.g. (B, H, W))."""
        t = target.flatten().to(torch.int64)
        p = pred.flatten().to(torch.int64)
        keep = (t != self.ignore_index) & (t >= 0) & (t < self.K)
        t, p = t[keep], p[keep]
        p = torch.where((p >= 0) & (p < self.K), p, torch.full_like(p, self.K))
        K1 = self.K + 1
        self._m += torch.bincount(t * K1 + p, minlength=self.K * K1).view(self.K, K1).cpu()

    def reduce(self) -> ConfusionMatrix:
        """Sum over DDP processes (in place)."""
        all_reduce_sum(self._m)
        return self

    def compute(self) -> dict:
        """{"iou": (K,) with NaN for never-seen classes, "miou", "pixel_acc", "mean_acc", "coverage"}."""
        m = self._m.double()
        tp = m[:, : self.K].diag()
        gt = m.sum(1)
        pr = m[:, : self.K].sum(0)
        union = gt + pr - tp
        nan = torch.full_like(tp, float("nan"))
        iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
        acc = torch.where(gt > 0, tp / gt.clamp(min=1), nan)
        total = gt.sum()
        return {
            "iou": iou.tolist(),
            "miou": float(torch.nanmean(iou)),
            "pixel_acc": float(tp.sum() / total) if total > 0 else float("nan"),
            "mean_acc": float(torch.nanmean(acc)),
            "coverage": float(1 - m[:, self.K].sum() / total) if total > 0 else float("nan"),
        }

    def foreground_shares(self) -> dict:
        """Shares of the scored pixels (class 0 the background): ``gt_fg`` whose ground truth is foreground,
        ``fg`` predicted foreground, ``abstain`` with no prediction (a pseudo label's ignore band)."""
        m = self._m.double()
        total = float(m.sum())
        if total == 0:
            return {"gt_fg": float("nan"), "fg": float("nan"), "abstain": float("nan")}
        return {"gt_fg": float(m[1:].sum()) / total, "fg": float(m[:, 1 : self.K].sum()) / total,
                "abstain": float(m[:, self.K].sum()) / total}  # fmt: skip
