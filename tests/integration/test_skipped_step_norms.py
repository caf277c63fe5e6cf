"""A skipped step leaves BatchNorm's running statistics as they were: they move in the forward, before the
non-finite guard decides, so a NaN forward would otherwise poison them and every later checkpoint."""

import torch

from tests.conftest import TINY


class _NaNInput(torch.nn.Module):
    """The method fed NaN images at the given 0-based iterations."""

    def __init__(self, method, bad):
        super().__init__()
        self.method, self.bad = method, set(bad)

    def forward(self, batch, it):
        if it in self.bad:
            batch = dict(batch, image=batch["image"] * float("nan"))
        return self.method(batch, it)


def test_a_nan_forward_leaves_batchnorm_statistics_unchanged(tmp_path, demo_root):
    from wsss.config import load_config
    from wsss.engine.trainer import Trainer

    cfg = load_config("configs/bench/fully_supervised.yaml", [*TINY, "--data.root", str(demo_root),
                      "--method.head", "deeplabv3", "--train.max_iters", "3", "--train.ckpt_every", "1",
                      "--train.keep_last", "5"])  # fmt: skip
    tr = Trainer(cfg, tmp_path / "run")
    tr.model = _NaNInput(tr.method, bad=[1])
    tr.fit()  # without the restore the NaN statistics stop the run: 'the weights hold NaN or Inf; not saved'
    ck = tmp_path / "run" / "checkpoints"
    a, b, c = (torch.load(ck / f"iter_00000{i}.pt", weights_only=True)["model"] for i in (1, 2, 3))
    stats = [k for k in a if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(stats) >= 6  # the ASPP's BatchNorms
    assert all(torch.equal(a[k], b[k]) for k in stats)  # iteration 2 was skipped: its statistics were put back
    assert not all(torch.equal(b[k], c[k]) for k in stats)  # iteration 3 updated them again
    assert all(torch.isfinite(c[k].float()).all() for k in stats)
