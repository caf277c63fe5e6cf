"""``wsss bench step``: median training-step time and its ratio to the bare backbone forward+backward.

Both are measured in one process on the same machine, batch (``train.batch_size``) and crop
(``data.crop_size``), on random images with 1-3 random tags each, after warm-up repeats, the two
interleaved repeat by repeat so that both see the same machine conditions. The step is
taken after the method's warm-ups (every loss on) and includes the optimizer update.
"""

from __future__ import annotations

import statistics
import time

import torch

from wsss.build import build_dataset, build_method
from wsss.data.classes import VOC
from wsss.engine.optim import build_optimizer
from wsss.engine.runtime import pick_device
from wsss.registry import DATASETS


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    _sync(device)
    t, c = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - t, time.process_time() - c


def bench_batch(cfg, classes, device) -> dict:
    """A fixed random batch at ``cfg``'s batch size and crop: images, 1-3 random tags each, valid, masks."""
    B, S = cfg.train.batch_size, cfg.data.crop_size
    g = torch.Generator().manual_seed(0)
    tags = torch.zeros(B, classes.num_fg)
    for b in range(B):
        tags[b, torch.randperm(classes.num_fg, generator=g)[: int(torch.randint(1, 4, (1,), generator=g))]] = 1
    return {"image": torch.randn(B, 3, S, S, generator=g).to(device), "tags": tags.to(device),
            "valid": torch.ones(B, S, S, dtype=torch.bool, device=device),
            "mask": torch.randint(0, classes.K, (B, S, S), generator=g).to(device)}  # fmt: skip


def build_for_bench(cfg):
    """(method in train mode, its optimizer, a fixed batch, device) for timing ``cfg``'s step."""
    from wsss.engine.threads import configure_threads

    configure_threads(cfg.train.threads)
    torch.manual_seed(0)
    try:
        classes = build_dataset(cfg, cfg.data.train_split, train=True, load_masks=False).classes
    except Exception:  # no data needed to time a step: fall back to the dataset's standard classes
        classes = getattr(DATASETS.get(cfg.data.dataset), "classes", None) or VOC
    device = pick_device(cfg.train.device)
    method = build_method(cfg, classes).to(device).train()
    return method, build_optimizer(method, cfg.optim), bench_batch(cfg, classes, device), device


def train_once(method, opt, batch: dict, it: int) -> None:
    """One full training step: forward with losses, backward, optimizer update, step-end work."""
    out = method.train_step(batch, it)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    method.on_step_end(it)  # EMA teachers, memory-bank writes: part of every training step


def bare_pass(method, batch: dict) -> None:
    """The bare backbone forward+backward on ``batch``'s images, the yardstick of the step ratios."""
    method.backbone(batch["image"]).feat.float().mean().backward()
    method.zero_grad(set_to_none=True)


def bench_step(cfg, repeats: int = 5, warmup: int = 2) -> dict:
    """{"step_s", "bare_fwd_bwd_s", "ratio", ...} for ``cfg``'s method: wall-time medians, their ratio,
    the median of the per-repeat ratios, the ratio of the minima and, on CPU, the same from process
    CPU time (a shared machine's wall time drifts with other tenants' load)."""
    method, opt, batch, device = build_for_bench(cfg)
    B, S = cfg.train.batch_size, cfg.data.crop_size
    it = cfg.train.max_iters - 1

    def step():
        train_once(method, opt, batch, it)

    def bare():
        bare_pass(method, batch)

    for _ in range(warmup):
        step()
        bare()
    steps, bares = [], []
    for _ in range(repeats):  # interleaved, so both see the same machine conditions
        steps.append(_time(step, device))
        bares.append(_time(bare, device))
    med = lambda xs, i: statistics.median(x[i] for x in xs)  # noqa: E731
    s, b = med(steps, 0), med(bares, 0)
    out = {
        "method": cfg.method_name, "backbone": cfg.model.backbone, "batch": B, "crop": S, "device": str(device),
        "threads": torch.get_num_threads(), "step_s": round(s, 4), "bare_fwd_bwd_s": round(b, 4),
        "ratio": round(s / b, 2),
        "ratio_paired_median": round(statistics.median(a[0] / c[0] for a, c in zip(steps, bares)), 2),
        "ratio_of_minima": round(min(x[0] for x in steps) / min(x[0] for x in bares), 2),
        "repeats": repeats, "warmup": warmup,
    }  # fmt: skip
    if device.type == "cpu":  # process CPU time does not count time the host gave to other tenants
        out.update(step_cpu_s=round(med(steps, 1), 4), bare_cpu_s=round(med(bares, 1), 4),
                   ratio_cpu=round(med(steps, 1) / med(bares, 1), 2))  # fmt: skip
    return out
