"""The trainer reads its losses back from the device once per step: on a GPU every tensor-to-Python conversion
(float, item, tolist, bool) waits for the device, so one per loss and micro-batch stalls the step. Counted with
a TorchFunctionMode on CPU, where the calls are the same."""

import sys
from pathlib import Path

import pytest
from torch.overrides import TorchFunctionMode

from tests.conftest import TINY

ENGINE = str(Path(__file__).resolve().parents[2] / "src" / "wsss" / "engine")
TO_HOST = {"__float__", "__bool__", "__int__", "item", "tolist", "numpy", "cpu"}


class HostReads(TorchFunctionMode):
    """Counts tensor-to-host conversions made by the engine's own code (not the method's)."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        caller = sys._getframe(1).f_code.co_filename
        if name in TO_HOST and caller.startswith(ENGINE):
            self.calls.append(f"{name} at {Path(caller).name}:{sys._getframe(1).f_lineno}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("clip", ["0", "1.0"])
def test_one_read_from_the_device_per_step_whatever_the_losses_and_micro_batches(tmp_path, demo_root, clip):
    from wsss.config import load_config
    from wsss.engine.trainer import Trainer

    cfg = load_config("configs/bench/toco.yaml", [*TINY, "--data.root", str(demo_root), "--train.max_iters", "3",
                      "--train.micro_batch", "1", "--optim.grad_clip", clip, "--method.seg_warmup", "1",
                      "--train.log_every", "100"])  # fmt: skip
    tr = Trainer(cfg, tmp_path / "run")
    data = iter(__import__("wsss.data.loader", fromlist=["train_loader"]).train_loader(
        tr.train_ds, tr.micro, 0, 0, 0, 1, 0))  # fmt: skip
    for it in range(2):
        with HostReads() as reads:
            step = tr.run_step(it, data)
        assert tr.accum == 2 and len(step.logs) >= 4  # two micro-batches, several named losses
        assert reads.calls == [reads.calls[0]] and reads.calls[0].startswith("tolist at runtime.py"), reads.calls
    # what the one read returned is what the log and the guard use: plain Python floats, the step taken
    assert step.taken and type(step.loss) is float and all(type(v) is float for v in step.logs.values())
