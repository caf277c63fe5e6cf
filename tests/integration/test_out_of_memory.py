"""Out of memory: one line naming what was being run and the setting that lowers its memory, no traceback.

The allocator failure is injected (no GPU here): CUDA's ``torch.OutOfMemoryError`` raised from the method's
forward, and the CPU allocator's RuntimeError from an evaluation."""

import pytest
import torch

from tests.conftest import TINY
from wsss.cli import main
from wsss.registry import METHODS

BASE = ["--config", "configs/bench/toco.yaml", *TINY, "--train.max_iters", "3", "--optim.warmup_iters", "1"]


def _oom_at(monkeypatch, it_fails: int, exc: Exception, where: str = "forward"):
    """Make the toco method's ``where`` (forward, or on_step_end: after the optimizer step) raise at ``it``."""
    cls = METHODS.get("toco")
    real = getattr(cls, where)

    def failing(self, *a):
        if a[-1] == it_fails:
            raise exc
        return real(self, *a)

    monkeypatch.setattr(cls, where, failing)


@pytest.mark.parametrize("micro, advice, where", [
    ("2", "set train.micro_batch 1 (gradients accumulate over more forwards; the batch and the recipe stay the same)",
     "forward"),
    ("1", "already one image per forward; set train.amp bf16 or lower data.crop_size (this changes the recipe), or a "
          "device with more memory", "on_step_end"),
])  # fmt: skip
def test_out_of_memory_in_training_names_the_batch_crop_and_micro_batch(tmp_path, demo_root, capsys, monkeypatch,
                                                                         micro, advice, where):  # fmt: skip
    _oom_at(monkeypatch, 1, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), where)
    run = tmp_path / "run"
    rc = main(["train", *BASE, "--data.root", str(demo_root), "--run-dir", str(run), "--train.micro_batch", micro])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1, err
    steps = "1 accumulation step(s)" if micro == "2" else "2 accumulation step(s)"
    assert err == (f"wsss: error: iteration 2: out of CPU memory in a training step of {micro} image(s) per forward "
                   f"at crop 48 px (train.batch_size 2 = micro_batch {micro} x {steps} x 1 process(es), full "
                   f"precision): {advice}")  # fmt: skip


def test_the_suggested_micro_batch_divides_the_batch_and_plain_runtime_errors_count():
    from wsss.engine.guard import is_out_of_memory, out_of_memory_advice

    advice = out_of_memory_advice(0, torch.device("cuda"), 9, 2, 1, 448, torch.bfloat16)  # 18 per process
    assert "micro_batch 9 x 2 accumulation" in advice and advice.endswith(
        ": set train.micro_batch 6 (gradients accumulate over more forwards; the batch and the recipe stay the same)"
    )
    assert out_of_memory_advice(0, torch.device("cuda"), 7, 1, 2, 448, None).count("train.micro_batch 1 ") == 1
    for text in (
        "CUDA error: out of memory",
        "cuBLAS: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate",
        "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
        "MPS backend out of memory (MPS allocated: 8 GB)",
    ):
        assert is_out_of_memory(RuntimeError(text)), text
    assert not is_out_of_memory(RuntimeError("CUDA error: device-side assert triggered"))
    assert not is_out_of_memory(ValueError("CUDA error: out of memory"))  # not an allocator's error type


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
