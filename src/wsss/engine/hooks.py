"""What runs after each training step, one behaviour per hook (the shape of detectron2's hooks).

:class:`~wsss.engine.trainer.Trainer` does the step itself (accumulation, AMP, DDP, backward, the
non-finite guard, the optimizer) and then calls, in order, every hook of ``trainer.hooks``:
progress bar, logging, checkpoint, evaluation. A user adds a behaviour by appending a :class:`Hook`
(``trainer.hooks.append(MyHook())``) without touching the loop. Hooks run on every process; a hook
that writes files does so on rank 0 and keeps collective calls (evaluation, barriers) on all ranks.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from wsss.data.io import dumps_results
from wsss.engine.checkpoint import save_rotating
from wsss.engine.guard import TrainingError, params_finite
from wsss.engine.rundir import evaluated_at
from wsss.utils import dist
from wsss.utils.files import atomic_write

log = logging.getLogger("wsss")


@dataclass
class StepInfo:
    """One finished step: ``it`` is its 1-based iteration (as logged), ``taken`` False when the guard
    skipped the optimizer step; ``loss`` and ``logs`` are the step's mean losses over its micro-batches."""

    it: int
    lr: float
    loss: float
    logs: dict[str, float] = field(default_factory=dict)
    taken: bool = True


class Hook:
    """Base class: override any of the three; ``trainer`` is the running Trainer, ``end`` the last iteration
    of this call of ``fit`` (``--stop-at``, else ``train.max_iters``)."""

    def before_train(self, trainer, end: int) -> None:
        """Before the first step of ``fit``."""

    def after_step(self, trainer, step: StepInfo, end: int) -> None:
        """After every step (taken or skipped)."""

    def after_train(self, trainer, end: int) -> None:
        """After the last step (not called when a step raised)."""


class ProgressHook(Hook):
    """A tqdm bar over the iterations, on rank 0 and only when stderr is a terminal."""

    def before_train(self, trainer, end: int) -> None:
        self.bar = None
        if dist.is_main() and sys.stderr.isatty():
            from tqdm import tqdm

            t = trainer.cfg.train
            self.bar = tqdm(total=t.max_iters, initial=trainer.start_iter, desc=f"train {trainer.cfg.method_name}",
                            dynamic_ncols=True)  # fmt: skip

    def after_step(self, trainer, step: StepInfo, end: int) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{step.loss:.3f}")

    def after_train(self, trainer, end: int) -> None:
        if self.bar is not None:
            self.bar.close()


class LogHook(Hook):
    """Every ``train.log_every`` steps and at the last: a metrics.jsonl record (losses, lr, seconds per
    iteration, skipped steps when any) and a console line."""

    def before_train(self, trainer, end: int) -> None:
        self.tic = time.perf_counter()

    def after_step(self, trainer, step: StepInfo, end: int) -> None:
        t = trainer.cfg.train
        if step.it % t.log_every and step.it != t.max_iters:
            return
        dt = (time.perf_counter() - self.tic) / max(1, step.it - trainer.start_iter)
        skipped = trainer.guard.skipped
        trainer.log_record({"iter": step.it, "lr": step.lr, "loss": step.loss, **step.logs, "sec_per_iter": dt,
                            **({"skipped_steps": skipped} if skipped else {})})  # fmt: skip
        log.info("iter %d/%d loss %.4f %s lr %.2e %.2fs/it", step.it, t.max_iters, step.loss,
                 " ".join(f"{k} {v:.4f}" for k, v in step.logs.items()), step.lr, dt)  # fmt: skip


class CheckpointHook(Hook):
    """``checkpoints/last.pt`` every ``train.ckpt_every`` steps and at ``end`` (``train.keep_last`` kept),
    never with non-finite weights."""

    def after_step(self, trainer, step: StepInfo, end: int) -> None:
        t = trainer.cfg.train
        if step.it % t.ckpt_every and step.it != end:
            return
        if not params_finite(trainer.method):
            raise TrainingError(f"iteration {step.it}: the weights hold NaN or Inf; not saved, last checkpoint: "
                                f"{trainer.checkpoint_name()}; lower optim.lr or set optim.grad_clip")  # fmt: skip
        if dist.is_main():
            save_rotating(trainer.run_dir / "checkpoints", trainer.state(step.it), step.it, t.keep_last)
        dist.barrier()


class EvalHook(Hook):
    """Val evaluation every ``train.eval_every`` steps and at ``train.max_iters`` (``best.pt`` kept); at the
    end of the schedule ``final_eval.json`` (also when a run resumed at its end still lacks it). A run
    resumed at a checkpoint whose evaluation was interrupted evaluates it first. The final results are
    ``trainer.results``."""

    @staticmethod
    def due(t, it: int) -> bool:
        """Whether the schedule ``t`` (train config) evaluates after iteration ``it``."""
        return (t.eval_every > 0 and it % t.eval_every == 0) or it == t.max_iters

    def before_train(self, trainer, end: int) -> None:
        trainer.results = None
        s, t = trainer.start_iter, trainer.cfg.train
        # resumed at a checkpoint whose evaluation was killed (the checkpoint is written first); read on every
        # rank, after the resume's barrier, so they agree; the end of the schedule is after_train's
        if 0 < s < t.max_iters and trainer.val_ds is not None and self.due(t, s) and not evaluated_at(
                trainer.run_dir / "metrics.jsonl", s):  # fmt: skip
            log.info("iteration %d: its evaluation did not finish before the run stopped; evaluating now", s)
            trainer.results = trainer.evaluate(s)
            trainer.save_best(s, trainer.results)

    def after_step(self, trainer, step: StepInfo, end: int) -> None:
        if self.due(trainer.cfg.train, step.it):
            trainer.results = trainer.evaluate(step.it)
            trainer.save_best(step.it, trainer.results)

    def after_train(self, trainer, end: int) -> None:
        t = trainer.cfg.train
        if end != t.max_iters:
            return
        if trainer.results is None and trainer.start_iter >= t.max_iters:  # resumed at the end, not yet evaluated
            trainer.results = trainer.evaluate(t.max_iters)
            trainer.save_best(t.max_iters, trainer.results)
        res = trainer.results
        if res is not None and dist.is_main():
            atomic_write(trainer.run_dir / "final_eval.json", lambda p: Path(p).write_text(dumps_results(res)))


def default_hooks() -> list[Hook]:
    """The trainer's hooks, in the order they run after a step."""
    return [ProgressHook(), LogHook(), CheckpointHook(), EvalHook()]
