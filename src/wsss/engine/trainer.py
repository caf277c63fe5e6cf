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
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from wsss.build import build_dataset, build_eval_dataset, build_method
from wsss.config import ConfigError, RunConfig, dump_config
from wsss.data.io import DataError, ensure_writable
from wsss.data.loader import eval_loader, train_loader
from wsss.engine.checkpoint import (
    load_checkpoint,
    load_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from wsss.engine.guard import (
    NonFiniteGuard,
    TrainingError,
    inference_out_of_memory_advice,
    is_out_of_memory,
    out_of_memory_advice,
    params_finite,
)
from wsss.engine.hooks import Hook, StepInfo, default_hooks
from wsss.engine.optim import build_optimizer, set_lr
from wsss.engine.rundir import RunDirError, RunLock, prepare_new_run, remove_temporaries, trim_metrics
from wsss.engine.runtime import amp_dtype, env_info, host_floats, pick_device, seed_everything
from wsss.engine.threads import busy_host_warning, configure_threads, cpu_budget
from wsss.evaluation.evaluators import format_table, headline, run_evaluation
from wsss.registry import METHODS
from wsss.utils import dist
from wsss.utils.files import atomic_write
from wsss.utils.progress import progress_reporter

log = logging.getLogger("wsss")


class Trainer:
    """Train ``cfg`` into ``run_dir``; ``resume`` continues from ``run_dir/checkpoints/last.pt``.

    Args:
        cfg: resolved RunConfig.
        run_dir: output directory (config.yaml, env.json, metrics.jsonl, checkpoints/).
        resume: continue an interrupted run.
        overwrite: a new run may replace the trainer's files of an earlier run in ``run_dir`` (without it,
            such a directory is refused: :mod:`wsss.engine.rundir`).
        hooks: what runs after each step (default :func:`~wsss.engine.hooks.default_hooks`: progress, logging,
            checkpoint, evaluation); ``trainer.hooks`` can be extended before :meth:`fit`.
    """

    def __init__(self, cfg: RunConfig, run_dir: str | Path, resume: bool = False, overwrite: bool = False,
                 hooks: list[Hook] | None = None) -> None:  # fmt: skip
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        if resume and not (self.run_dir / "checkpoints" / "last.pt").is_file():
            raise RunDirError(f"{self.run_dir}: no checkpoints/last.pt to resume from (a run stopped before its first "
                              "checkpoint starts again without --resume, with --overwrite)")  # fmt: skip
        if not resume:  # refused before any long work; with --overwrite nothing is removed until all checks passed
            prepare_new_run(self.run_dir, overwrite, remove=False)
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
        self.train_ds.skip_bad = cfg.data.max_bad_images
        self.classes = self.train_ds.classes
        self.method = build_method(cfg, self.classes).to(self.device)
        self.val_ds = None
        if cfg.train.eval_every >= 0:
            self.val_ds = build_eval_dataset(cfg, cfg.eval.split or cfg.data.val_split)  # tags only: tag-level score
            if cfg.data.max_val_images:
                self.val_ds.items = self.val_ds.items[: cfg.data.max_val_images]
        self._preflight()
        self.opt = build_optimizer(self.method, cfg.optim)
        self.amp = amp_dtype(t.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.start_iter = 0
        self.best: dict = {}  # {"seg_miou", "iter"} of checkpoints/best.pt
        self.guard = NonFiniteGuard(t.nan_patience)
        # running statistics move in the forward, before the guard decides: a skipped step puts them back
        self._norms = [m for m in self.method.modules()
                       if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]  # fmt: skip
        self.hooks = default_hooks() if hooks is None else list(hooks)
        self.results: dict | None = None  # the final evaluation, once fit has run (EvalHook)
        self.finished = False  # resumed a run whose final evaluation is already written
        self.lock = RunLock(self.run_dir)  # rank 0 holds it from its first write to the end of fit
        if resume:
            last = self.run_dir / "checkpoints" / "last.pt"
            self._load(last)
            if self.start_iter > t.max_iters:
                raise ConfigError(f"config key 'train.max_iters': {t.max_iters} is below iteration {self.start_iter} "
                                  f"of {last}; a resumed run keeps or lengthens its schedule")  # fmt: skip
            # on every rank (they must agree); rank 0 below touches neither file it reads
            self.finished = self.start_iter >= t.max_iters and self._final_written()
            if dist.is_main():
                self.lock.acquire()
                remove_temporaries(self.run_dir)
                trim_metrics(self.run_dir / "metrics.jsonl", self.start_iter,
                             redo_eval=self.start_iter >= t.max_iters and not self.finished)  # fmt: skip
            dist.barrier()
        elif dist.is_main():
            ensure_writable(self.run_dir)
            self.lock.acquire()
            prepare_new_run(self.run_dir, overwrite)  # again, under the lock: another process may have begun
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

    def _preflight(self) -> None:
        """Open every image's (and read mask's) header of the train and val splits before iteration 1, so a
        missing or broken file stops the run now, with the whole list logged, not hours in."""
        from wsss.data.check import preflight

        problems = []
        val_split = self.cfg.eval.split or self.cfg.data.val_split
        for ds, split in ((self.train_ds, self.cfg.data.train_split), (self.val_ds, val_split)):
            if ds is not None:
                problems += preflight(ds, progress_reporter(f"check {split}", leave=False) if dist.is_main() else None)
        if problems:
            if dist.is_main() and len(problems) > 1:
                for p in problems:
                    log.error("%s", p)
            more = f" (and {len(problems) - 1} more, listed above)" if len(problems) > 1 else ""
            raise DataError(f"{problems[0]}{more}; `wsss data check ROOT` reports every problem of a dataset")

    def state(self, it: int) -> dict:
        """Everything exact resume needs after iteration ``it``: weights, optimizer, scaler, RNG, classes, best."""
        return {
            "model": self.method.state_dict(), "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(),
            "iter": it, "rng": rng_state(), "method": self.cfg.method_name, "classes": list(self.classes.names),
            "background": self.classes.background, "best": dict(self.best),
        }  # fmt: skip

    def save_best(self, it: int, res: dict | None) -> None:
        """``checkpoints/best.pt`` (weights, classes and the score only: no optimizer) whenever the val seg
        mIoU beats the best so far; runs without val masks have no seg score and no best.pt."""
        miou = (res or {}).get("seg", {}).get("miou")
        if miou is None or not math.isfinite(miou) or miou <= self.best.get("seg_miou", float("-inf")):
            return
        if not dist.is_main() or not params_finite(self.method):  # a NaN model can still score a finite mIoU
            return
        self.best = {"seg_miou": float(miou), "iter": it}
        resume_only = ("optimizer", "scaler", "rng")
        state = {k: v for k, v in self.state(it).items() if k not in resume_only}
        save_checkpoint(self.run_dir / "checkpoints" / "best.pt", state)
        log.info("best.pt: seg mIoU %.2f at iteration %d", 100 * miou, it)

    def _load(self, path: Path) -> None:
        saved = load_checkpoint(path, map_location=self.device)
        load_weights(self.method, saved["model"], path)
        self.opt.load_state_dict(saved["optimizer"])
        self.scaler.load_state_dict(saved["scaler"])
        set_rng_state(saved["rng"])
        best = path.parent / "best.pt"  # last.pt is saved before its iteration's evaluation: best.pt knows more
        self.best = dict(load_checkpoint(best)["best"]) if best.is_file() else dict(saved.get("best", {}))
        self.start_iter = int(saved["iter"])
        log.info("resumed from %s at iteration %d", path, self.start_iter)

    def checkpoint_name(self) -> str:
        """``checkpoints/last.pt`` and its iteration, for messages ("none yet" before the first)."""
        path = self.run_dir / "checkpoints" / "last.pt"
        if not path.is_file():
            return "none yet"
        return f"{path} (iteration {int(load_checkpoint(path)['iter'])})"

    def _final_written(self) -> bool:
        """final_eval.json exists and was written after last.pt (it describes the last weights)."""
        final, last = self.run_dir / "final_eval.json", self.run_dir / "checkpoints" / "last.pt"
        return final.is_file() and final.stat().st_mtime_ns >= last.stat().st_mtime_ns

    def log_record(self, rec: dict) -> None:
        """Append ``rec`` (with an ``iter``) to metrics.jsonl, and its numbers to TensorBoard when on (rank 0)."""
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
            progress = progress_reporter(f"evaluate {split}", leave=False)  # large images make an evaluation long
        try:
            res = run_evaluation(self.method, loader, self.classes, self.cfg.eval, self.device, which, progress)
        except RuntimeError as e:
            if not is_out_of_memory(e):
                raise
            ev = self.cfg.eval
            raise TrainingError(f"iteration {it}: " + inference_out_of_memory_advice(
                self.device.type, ev.scales, ev.flip, ev.batch_size, ev.window)) from e  # fmt: skip
        self.log_record({"iter": it, "split": split, **headline(res)})
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
        if self.finished:
            self.lock.release()
            log.info("%s: finished at iteration %d; its final_eval.json is kept", self.run_dir, self.start_iter)
            return json.loads((self.run_dir / "final_eval.json").read_text())
        if dist.is_main():
            self.lock.acquire()
        try:
            return self._fit(stop_at)
        finally:
            self.lock.release()

    def _fit(self, stop_at: int) -> dict | None:
        t, cfg = self.cfg.train, self.cfg
        world = dist.world_size()
        loader = train_loader(self.train_ds, self.micro, t.seed, self.start_iter * t.batch_size, dist.rank(), world,
                              cfg.data.num_workers)  # fmt: skip
        data = iter(loader)
        self.method.train()
        end = min(t.max_iters, stop_at) if stop_at > 0 else t.max_iters
        for h in self.hooks:
            h.before_train(self, end)
        for it in range(self.start_iter, end):
            step = self.run_step(it, data)
            for h in self.hooks:
                h.after_step(self, step, end)
        for h in self.hooks:
            h.after_train(self, end)
        return self.results

    def run_step(self, it: int, data) -> StepInfo:
        """One optimizer step at 0-based iteration ``it``: ``accum`` micro-batches from ``data`` (forward under
        autocast, backward, DDP sync on the last), then the non-finite guard decides whether the optimizer
        steps (skipped: weights, optimizer and the method's queued bank writes stay as they were). Running out
        of memory anywhere in it (loading, forward, backward, the optimizer's first state, the methods' banks)
        is a one-line TrainingError naming the batch make-up and what lowers the memory."""
        try:
            return self._step(it, data)
        except RuntimeError as e:
            if not is_out_of_memory(e):
                raise
            raise TrainingError(out_of_memory_advice(it, self.device, self.micro, self.accum, dist.world_size(),
                                                     self.cfg.data.crop_size, self.amp)) from e  # fmt: skip

    def _step(self, it: int, data) -> StepInfo:
        cfg, world = self.cfg, dist.world_size()
        norm_stats = [[b.clone() for b in m.buffers(recurse=False)] for m in self._norms]
        lr = set_lr(self.opt, it, cfg.train.max_iters, cfg.optim)
        # losses stay on the device until the step's end: one host sync per step for all of them (and the
        # gradient norm), not one per loss and micro-batch
        sums: dict[str, torch.Tensor | float] = {}
        total: torch.Tensor | float = 0.0
        names: list[str] = []
        for k in range(self.accum):
            batch = next(data)
            names += list(batch.get("name", []))
            batch = {k2: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k2, v in batch.items()}
            sync = nullcontext() if (world == 1 or k == self.accum - 1) else self.model.no_sync()
            with sync, torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                out = self.model(batch, it)
                loss = out.loss / self.accum
            self.scaler.scale(loss).backward()  # also when non-finite: DDP's gradient all-reduce must run
            total = total + loss.detach().float()
            for name, v in out.logs.items():
                v = v.detach().float() if torch.is_tensor(v) else float(v)
                sums[name] = sums.get(name, 0.0) + v / self.accum
        grad_norm = None
        if cfg.optim.grad_clip > 0:
            self.scaler.unscale_(self.opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.method.parameters(), cfg.optim.grad_clip)
        elif not self.scaler.is_enabled():  # fp16's scaler skips steps with inf gradients itself
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.method.parameters() if p.grad is not None])
        if self.scaler.is_enabled():
            grad_norm = None  # unscaled fp16 gradients may overflow; the scaler decides on those
        values = host_floats([total, *sums.values(), *([] if grad_norm is None else [grad_norm])])
        logs = dict(zip(sums, values[1 : 1 + len(sums)]))
        # a sum of losses is finite exactly when every micro-batch's loss was (inf - inf is nan)
        loss_ok, norm = math.isfinite(values[0]), (values[-1] if grad_norm is not None else None)
        taken = self.guard.check(it, loss_ok, norm, logs | {"loss": values[0]}, names, self.checkpoint_name)
        if taken:
            self.scaler.step(self.opt)
            self.scaler.update()
            self.opt.zero_grad(set_to_none=True)
            self.method.on_step_end(it)
        else:
            if self.scaler.is_enabled():  # reset its per-step state (unscale_ may have run) and back the scale off
                self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
            self.opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for m, saved in zip(self._norms, norm_stats):
                    for b, v in zip(m.buffers(recurse=False), saved):
                        b.copy_(v)
            self.method.on_step_skipped(it)
        return StepInfo(it + 1, lr, values[0], logs, taken)


def default_run_dir(cfg: RunConfig) -> Path:
    """``out_dir/run_name`` or ``out_dir/<method>-<dataset>-<timestamp>``."""
    name = cfg.train.run_name or f"{cfg.method_name}-{cfg.data.dataset}-{datetime.now():%Y%m%d-%H%M%S}"
    return Path(os.path.expanduser(cfg.train.out_dir)) / name
