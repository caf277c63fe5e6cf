"""AdamW with backbone / head learning rates and the warm-up + poly (or cosine) schedule."""

from __future__ import annotations

import math

import torch

from wsss.config import ConfigError
from wsss.methods.base import Method


def _no_decay(name: str, p: torch.Tensor) -> bool:
    return (
        p.ndim <= 1
        or name.endswith(".bias")
        or name.endswith(".token")  # FSR's aggregation token (its cls_token), as the official code
        or any(k in name for k in ("pos_embed", "cls_token", "reg_token", "mask_token"))
    )


def build_optimizer(method: Method, ocfg) -> torch.optim.AdamW:
    """AdamW over ``method.param_groups()``; biases, norms and position/class tokens get no weight decay.

    Each group's ``lr_mult`` (None: ``ocfg.head_lr_mult``) scales ``ocfg.lr``, the rate for the total batch.
    """
    names = {id(p): n for n, p in method.named_parameters()}
    groups = []
    for g in method.param_groups():
        mult = ocfg.head_lr_mult if g.get("lr_mult") is None else g["lr_mult"]
        dec = [p for p in g["params"] if not _no_decay(names.get(id(p), ""), p)]
        nodec = [p for p in g["params"] if _no_decay(names.get(id(p), ""), p)]
        for params, wd, suffix in ((dec, ocfg.weight_decay, ""), (nodec, 0.0, "_no_wd")):
            if params:
                groups.append(
                    {"params": params, "lr_mult": mult, "weight_decay": wd, "name": g.get("name", "") + suffix}
                )
    # The fused kernel (CPU and CUDA) is several times faster than the per-tensor loop; same update.
    fused = all(p.is_floating_point() for g in groups for p in g["params"])
    opt = torch.optim.AdamW(groups, lr=ocfg.lr, betas=tuple(ocfg.betas), fused=fused)
    for g in opt.param_groups:
        g["lr"] = ocfg.lr * g["lr_mult"]
    return opt


def lr_factor(it: int, max_iters: int, ocfg) -> float:
    """Multiplier of the base lr at iteration ``it``: linear warm-up from warmup_lr, then poly or cosine."""
    if it < ocfg.warmup_iters:
        start = ocfg.warmup_lr / ocfg.lr
        return start + (1 - start) * it / max(1, ocfg.warmup_iters)
    t = min(1.0, (it - ocfg.warmup_iters) / max(1, max_iters - ocfg.warmup_iters))
    if ocfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    if ocfg.schedule == "poly":
        return (1 - t) ** ocfg.power
    raise ConfigError(f"unknown optim.schedule '{ocfg.schedule}' (poly | cosine)")


def set_lr(opt: torch.optim.Optimizer, it: int, max_iters: int, ocfg) -> float:
    """Set every group's lr for iteration ``it``; returns the base (backbone) lr."""
    f = lr_factor(it, max_iters, ocfg)
    for g in opt.param_groups:
        g["lr"] = ocfg.lr * g["lr_mult"] * f
    return ocfg.lr * f
