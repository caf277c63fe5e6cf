"""Shared fixtures: tiny demo data, tiny model overrides, offline hub."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

WEIGHTS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "weights",
                       "vit_small_patch14_dinov2.imgfocus.safetensors")  # fmt: skip

# A 0.3 M-parameter ViT, 48 px crops (3x3 tokens at patch 16), no pretrained weights: fast CPU runs.
TINY = [
    "--model.backbone", "test_vit", "--model.weights", "none", "--model.seg_hidden", "16", "--model.drop_path", "0",
    "--data.crop_size", "48", "--data.num_workers", "0", "--train.batch_size", "2", "--train.log_every", "1",
    "--train.ckpt_every", "100", "--train.eval_every", "0", "--optim.warmup_iters", "1",
]  # fmt: skip


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A tiny demo dataset: 8 train and 4 val images of 64 px."""
    from wsss.data.synthetic import DemoConfig, generate

    return generate(tmp_path_factory.mktemp("demo"), DemoConfig(n_train=8, n_val=4, size=64, clutter=2))


@pytest.fixture()
def tiny_args(demo_root):
    """Overrides that point a demo recipe at the tiny data and model."""
    return ["--data.root", str(demo_root), *TINY]


@pytest.fixture(scope="session")
def tiny_toco_run(tmp_path_factory, demo_root):
    """A 4-iteration run of the bench toco recipe (tiny model, seg head from iteration 2) on the tiny demo
    data; tests read it and write their outputs elsewhere."""
    from wsss.cli import main

    run = tmp_path_factory.mktemp("toco") / "run"
    rc = main(["train", "--config", "configs/bench/toco.yaml", "--run-dir", str(run), "--data.root", str(demo_root),
               *TINY, "--train.max_iters", "4", "--method.seg_warmup", "2", "--optim.warmup_iters", "2"])  # fmt: skip
    assert rc == 0
    return run
