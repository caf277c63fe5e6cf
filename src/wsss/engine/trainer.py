"""Iteration-based trainer: device, DDP, AMP, gradient accumulation, schedule, checkpoints, logging.

Methods own their step; the trainer never looks at a method's name. ``train.batch_size`` is the
total batch: each optimizer step sees exactly that many images whatever the process count, through
accumulation of ``micro_batch``-sized forwards. Resume restores model, optimizer, scaler, RNG states
and the data position, so an interrupted run continues as if it never stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from wsss.build import build_dataset, build_eval_dataset, build_method
from wsss.config import ConfigError, RunConfig, dump_config
from wsss.data.io import atomic_write, dumps_results
from wsss.data.loader import eval_loader, train_loader
from wsss.engine import dist
from wsss.engine.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from wsss.engine.optim import build_optimizer, set_lr
from wsss.engine.threads import busy_host_warning, configure_threads, cpu_budget
from wsss.evaluation.evaluators import format_table, headline, run_evaluation
from wsss.progress import tty_progress
from wsss.registry import METHODS

log = logging.getLogger("wsss")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``train.amp`` on ``device`` (None: fp32)."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode in ("auto", "bf16"):
        return torch.bfloat16
    if mode == "fp16":
        return torch.float16
    raise ConfigError(f"config key 'train.amp': unknown value '{mode}' (auto | bf16 | fp16 | off)")


def git_state() -> tuple[str, bool]:
    """(commit SHA, whether tracked files differ from it) of the source tree; ("", False) outside git."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip()  # fmt: skip

    try:
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except Exception:
        return "", False


def env_info(weights_source: str) -> dict:
    """Versions, git SHA, world size and weights source, for env.json."""
    import timm
    import torchvision

    sha, dirty = git_state()
    from wsss import __version__

    return {
        "wsss": __version__, "git_sha": sha, "python": sys.version.split()[0], "platform": platform.platform(),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
        "git_dirty": dirty, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "world_size": dist.world_size(),
        "weights_source": weights_source, "started": datetime.now().isoformat(timespec="seconds"),
        "argv": sys.argv,
    }  # fmt: skip


class Trainer:
    """Train ``cfg`` into ``run_dir``; ``resume`` continues from ``run_dir/checkpoints/last.pt``.

    Args:
        cfg: resolved RunConfig.
        run_dir: output directory (config.yaml, env.json, metrics.jsonl, checkpoints/).
        resume: continue an interrupted run.
    """

    def __init__(self, cfg: RunConfig, run_dir: str | Path, resume: bool = False) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.device = dist.init_from_env(pick_device(cfg.train.device))
        t = cfg.train
        world = dist.world_size()
        micro = t.micro_batch or t.batch_size // world
        if micro < 1 or t.batch_size % (micro * world):
            raise ConfigError(
                f"config key 'train.batch_size': {t.batch_size} is not a multiple of "
                f"micro_batch {micro} x {world} processes"
            )
        self.micro, self.accum = micro, t.batch_size // (micro * world)
        self.threads = configure_threads(t.threads)
        if (warning := busy_host_warning(self.threads)) and dist.is_main():
            log.warning(warning)
        seed_everything(t.seed)
        needs_masks = METHODS.get(cfg.method_name).needs_masks  # weak methods never read training masks
        if cfg.data.mask_dir and not needs_masks:
            raise ConfigError(f"config key 'data.mask_dir': {cfg.method_name} trains on tags and never reads "
                              "masks; train a method on masks with it (fully_supervised, any method.head)")  # fmt: skip
        self.train_ds = build_dataset(cfg, cfg.data.train_split, train=True, load_masks=needs_masks, use_mask_dir=True)
        self.classes = self.train_ds.classes
        self.method = build_method(cfg, self.classes).to(self.device)
        self.val_ds = None
        if cfg.train.eval_every >= 0:
            self.val_ds = build_eval_dataset(cfg, cfg.eval.split or cfg.data.val_split)  # tags only: tag-level score
            if cfg.data.max_val_images:
                self.val_ds.items = self.val_ds.items[: cfg.data.max_val_images]
        self.opt = build_optimizer(self.method, cfg.optim)
        self.amp = amp_dtype(t.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.start_iter = 0
        self.best: dict = {}  # {"seg_miou", "iter"} of checkpoints/best.pt
        if resume:
            self._load(self.run_dir / "checkpoints" / "last.pt")
        elif dist.is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # an earlier run's best.pt in this directory would pair its weights with this run's config
            (self.run_dir / "checkpoints" / "best.pt").unlink(missing_ok=True)
            text = dump_config(cfg)
            atomic_write(self.run_dir / "config.yaml", lambda p: Path(p).write_text(text))
            env = env_info(self.method.backbone.weights_source) | {"threads": self.threads, "cpu_budget": cpu_budget()}
            atomic_write(self.run_dir / "env.json", lambda p: Path(p).write_text(json.dumps(env, indent=2)))
        self.tb = None
        if cfg.train.tensorboard and dist.is_main():
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "config key 'train.tensorboard': TensorBoard is not installed (pip install 'wsss[tb]')"
                ) from None
            self.tb = SummaryWriter(str(self.run_dir / "tb"))
        self.model = self.method
        if world > 1:
            self.model = DistributedDataParallel(
                self.method, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,
            )  # fmt: skip

    def _state(self, it: int) -> dict:
        return {
            "model": self.method.state_dict(), "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(),
            "iter": it, "rng": rng_state(), "method": self.cfg.method_name, "classes": list(self.classes.names),
            "background": self.classes.background, "best": dict(self.best),
        }  # fmt: skip

    def _save_best(self, it: int, res: dict | None) -> None:
        """``checkpoints/best.pt`` (weights, classes and the score only: no optimizer) whenever the val seg
        mIoU beats the best so far; runs without val masks have no seg score and no best.pt."""
        miou = (res or {}).get("seg", {}).get("miou")
        if miou is None or not math.isfinite(miou) or miou <= self.best.get("seg_miou", float("-inf")):
            return
        if not dist.is_main():
            return
        self.best = {"seg_miou": float(miou), "iter": it}
        resume_only = ("optimizer", "scaler", "rng")
        state = {k: v for k, v in self._state(it).items() if k not in resume_only}
        save_checkpoint(self.run_dir / "checkpoints" / "best.pt", state)
        log.info("best.pt: seg mIoU %.2f at iteration %d", 100 * miou, it)

    def _load(self, path: Path) -> None:
        st = load_checkpoint(path, map_location=self.device)
        self.method.load_state_dict(st["model"])
        self.opt.load_state_dict(st["optimizer"])
        self.scaler.load_state_dict(st["scaler"])
        set_rng_state(st["rng"])
        best = path.parent / "best.pt"  # last.pt is saved before its iteration's evaluation: best.pt knows more
        self.best = dict(load_checkpoint(best)["best"]) if best.is_file() else dict(st.get("best", {}))
        self.start_iter = int(st["iter"])
        log.info("resumed from %s at iteration %d", path, self.start_iter)

    def _log(self, rec: dict) -> None:
        if dist.is_main():
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            if self.tb is not None:
                for k, v in rec.items():
                    if k != "iter" and isinstance(v, (int, float)):
                        self.tb.add_scalar(k if "miou" in k else f"train/{k}", v, rec["iter"])

    def evaluate(self, it: int) -> dict | None:
        """Evaluate on the val split, log to metrics.jsonl; returns the results (rank 0)."""
        if self.val_ds is None:
            return None
        loader = eval_loader(
            self.val_ds, self.cfg.eval.batch_size, dist.rank(), dist.world_size(), self.cfg.data.num_workers
        )
        which = ("seg", "cam", "pseudo") if self.val_ds.load_masks else ("tags",)
        split = self.cfg.eval.split or self.cfg.data.val_split
        progress = None
        if dist.is_main():
            log.info("iteration %d: evaluating %d images of split %s", it, len(self.val_ds), split)
            progress = tty_progress(f"evaluate {split}", leave=False)  # large images make an evaluation long
        res = run_evaluation(self.method, loader, self.classes, self.cfg.eval, self.device, which, progress)
        self._log({"iter": it, "split": split, **headline(res)})
        if dist.is_main():
            log.info("iteration %d evaluation:\n%s", it, format_table(res, self.classes))
            if self.tb is not None:
                from wsss.viz.report import prediction_grid

                self.tb.add_image("val/predictions", prediction_grid(self.method, self.val_ds, self.device), it,
                                  dataformats="HWC")  # fmt: skip
                self.tb.flush()
        return res

    def fit(self, stop_at: int = 0) -> dict | None:
        """Run to ``train.max_iters`` (or stop after iteration ``stop_at`` > 0 with the schedule unchanged,
        to be resumed later); returns the final evaluation results, also written to final_eval.json."""
        t, cfg = self.cfg.train, self.cfg
        world = dist.world_size()
        loader = train_loader(self.train_ds, self.micro, t.seed, self.start_iter * t.batch_size, dist.rank(), world,
                              cfg.data.num_workers)  # fmt: skip
        data = iter(loader)
        self.method.train()
        bar = None
        if dist.is_main() and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=t.max_iters, initial=self.start_iter, desc=f"train {cfg.method_name}", dynamic_ncols=True)
        tic = time.perf_counter()
        res = None
        end = min(t.max_iters, stop_at) if stop_at > 0 else t.max_iters
        for it in range(self.start_iter, end):
            lr = set_lr(self.opt, it, t.max_iters, cfg.optim)
            logs: dict[str, float] = {}
            total = 0.0
            for k in range(self.accum):
                batch = next(data)
                batch = {
                    k2: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k2, v in batch.items()
                }
                sync = nullcontext() if (world == 1 or k == self.accum - 1) else self.model.no_sync()
                with sync, torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                    out = self.model(batch, it)
                    loss = out.loss / self.accum
                if not torch.isfinite(out.loss):
                    raise FloatingPointError(
                        f"iteration {it}: loss is {out.loss.item()} ({ {k: float(v) for k, v in out.logs.items()} })"
                    )
                self.scaler.scale(loss).backward()
                total += float(loss.detach())
                for name, v in out.logs.items():
                    logs[name] = logs.get(name, 0.0) + float(v) / self.accum
            if cfg.optim.grad_clip > 0:
                self.scaler.unscale_(self.opt)
                torch.nn.utils.clip_grad_norm_(self.method.parameters(), cfg.optim.grad_clip)
            self.scaler.step(self.opt)
            self.scaler.update()
            self.opt.zero_grad(set_to_none=True)
            self.method.on_step_end(it)
            done = it + 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{total:.3f}")
            if done % t.log_every == 0 or done == t.max_iters:
                dt = (time.perf_counter() - tic) / max(1, done - self.start_iter)
                self._log({"iter": done, "lr": lr, "loss": total, **logs, "sec_per_iter": dt})
                log.info("iter %d/%d loss %.4f %s lr %.2e %.2fs/it", done, t.max_iters, total,
                         " ".join(f"{k} {v:.4f}" for k, v in logs.items()), lr, dt)  # fmt: skip
            if done % t.ckpt_every == 0 or done == end:
                if dist.is_main():
                    save_checkpoint(self.run_dir / "checkpoints" / "last.pt", self._state(done))
                dist.barrier()
            if (t.eval_every > 0 and done % t.eval_every == 0) or done == t.max_iters:
                res = self.evaluate(done)
                self._save_best(done, res)
        if bar is not None:
            bar.close()
        if res is None and end == t.max_iters and self.start_iter >= t.max_iters:
            res = self.evaluate(t.max_iters)  # resumed at the end: the final evaluation had not been written
            self._save_best(t.max_iters, res)
        if res is not None and end == t.max_iters and dist.is_main():
            atomic_write(self.run_dir / "final_eval.json", lambda p: Path(p).write_text(dumps_results(res)))
        return res


def default_run_dir(cfg: RunConfig) -> Path:
    """``out_dir/run_name`` or ``out_dir/<method>-<dataset>-<timestamp>``."""
    name = cfg.train.run_name or f"{cfg.method_name}-{cfg.data.dataset}-{datetime.now():%Y%m%d-%H%M%S}"
    return Path(os.path.expanduser(cfg.train.out_dir)) / name
