"""Out of memory: one line naming what was being run and the setting that lowers its memory, no traceback.

The allocator failure is injected (no GPU here): CUDA's ``torch.OutOfMemoryError`` raised from the method's
forward, and the CPU allocator's RuntimeError from an evaluation."""

import pytest
import torch

from tests.conftest import TINY
from wsss.cli import main
from wsss.registry import METHODS

BASE = ["--config", "configs/bench/toco.yaml", *TINY, "--train.max_iters", "3", "--optim.warmup_iters", "1"]


def _oom_at(monkeypatch, it_fails: int, exc: Exception):
    cls = METHODS.get("toco")
    forward = cls.forward

    def failing(self, batch, it):
        if it == it_fails:
            raise exc
        return forward(self, batch, it)

    monkeypatch.setattr(cls, "forward", failing)


@pytest.mark.parametrize("micro, advice", [
    ("2", "set train.micro_batch 1 (gradients accumulate over more forwards; the batch and the recipe stay the same)"),
    ("1", "already one image per forward; set train.amp bf16 or lower data.crop_size (this changes the recipe), or a "
          "device with more memory"),
])  # fmt: skip
def test_out_of_memory_in_training_names_the_batch_crop_and_micro_batch(tmp_path, demo_root, capsys, monkeypatch,
                                                                         micro, advice):  # fmt: skip
    _oom_at(monkeypatch, 1, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    run = tmp_path / "run"
    rc = main(["train", *BASE, "--data.root", str(demo_root), "--run-dir", str(run), "--train.micro_batch", micro])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1, err
    steps = "1 accumulation step(s)" if micro == "2" else "2 accumulation step(s)"
    assert err == (f"wsss: error: iteration 2: out of CPU memory in a forward/backward of {micro} image(s) at crop 48 "
                   f"px (train.batch_size 2 = micro_batch {micro} x {steps} x 1 process(es), full precision): "
                   f"{advice}")  # fmt: skip


def test_a_failure_that_is_not_out_of_memory_is_not_disguised(tmp_path, demo_root, monkeypatch):
    _oom_at(monkeypatch, 0, RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        main(["train", *BASE, "--data.root", str(demo_root), "--run-dir", str(tmp_path / "run")])


def test_out_of_memory_in_evaluation_names_the_inference_settings(tmp_path, demo_root, tiny_toco_run, capsys,
                                                                  monkeypatch):  # fmt: skip
    import wsss.engine.trainer as trainer
    import wsss.evaluation.evaluators as ev

    def no_memory(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 40000000000000 bytes")  # fmt: skip

    monkeypatch.setattr(ev, "run_evaluation", no_memory)
    monkeypatch.setattr(trainer, "run_evaluation", no_memory)
    assert main(["evaluate", str(tiny_toco_run), "--data.root", str(demo_root)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        "wsss: error: out of CPU memory in whole-image inference: set eval.window 448 (seg logits from "
        "overlapping windows), eval.batch_size 1, fewer eval.scales, or data.max_side 1024 for large images"
    )
    rc = main(["train", *BASE, "--data.root", str(demo_root), "--run-dir", str(tmp_path / "run"),
               "--train.eval_every", "2", "--eval.scales", "[1.0,0.5]"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err == (
        "wsss: error: iteration 2: out of CPU memory in whole-image inference (eval.batch_size "
        "8, eval.scales [1.0, 0.5], eval.flip false, eval.window 0): set eval.window 448 (seg "
        "logits from overlapping windows), eval.batch_size 1, fewer eval.scales, or "
        "data.max_side 1024 for large images"
    )  # the bench recipe evaluates 8 at once
