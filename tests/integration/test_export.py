"""best.pt and ``wsss export``: safetensors (reloadable by wsss.load), ONNX (parity with PyTorch under
onnxruntime, any batch and image size) and TorchScript (traced, checked at other sizes)."""

import json

import numpy as np
import pytest
import torch

import wsss
from wsss.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory, demo_root):
    from tests.conftest import TINY

    run = tmp_path_factory.mktemp("exp") / "run"
    rc = main(["train", "--config", "configs/bench/toco.yaml", "--run-dir", str(run), "--data.root", str(demo_root),
               *TINY, "--train.max_iters", "6", "--method.seg_warmup", "2", "--optim.warmup_iters", "2",
               "--train.eval_every", "2"])  # fmt: skip
    assert rc == 0
    return run


def test_best_checkpoint_is_the_best_evaluation_weights_only(run, demo_root):
    from wsss.engine.checkpoint import load_checkpoint

    evals = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if "seg_miou" in ln]
    assert [e["iter"] for e in evals] == [2, 4, 6]
    best = max(evals, key=lambda e: e["seg_miou"])  # first of ties: a later equal score does not replace it
    st = load_checkpoint(run / "checkpoints" / "best.pt")
    assert "optimizer" not in st and st["iter"] == best["iter"]
    assert st["best"] == {"seg_miou": pytest.approx(best["seg_miou"]), "iter": best["iter"]}
    assert load_checkpoint(run / "checkpoints" / "last.pt")["best"]["seg_miou"] <= st["best"]["seg_miou"]
    assert main(["evaluate", str(run / "checkpoints" / "best.pt"), "--which", "seg", "--out",
                 str(run / "best_eval.json")]) == 0  # fmt: skip
    score = json.loads((run / "best_eval.json").read_text())["results"]["seg"]["miou"]
    assert score == pytest.approx(best["seg_miou"], abs=1e-6)


def test_resume_keeps_the_best_score_of_best_pt(demo_root, tmp_path):
    """last.pt is saved before its iteration's evaluation, so a resumed run must take the best score from
    best.pt; a sentinel score written there must survive the resume (no later evaluation can beat 2.0)."""
    from tests.conftest import TINY
    from wsss.config import load_config
    from wsss.engine.checkpoint import load_checkpoint, save_checkpoint
    from wsss.engine.trainer import Trainer

    run = tmp_path / "r"
    args = ["--data.root", str(demo_root), *TINY, "--train.max_iters", "6", "--method.seg_warmup", "2",
            "--optim.warmup_iters", "2", "--train.eval_every", "2"]  # fmt: skip
    assert main(["train", "--config", "configs/bench/toco.yaml", "--run-dir", str(run), *args, "--stop-at", "4"]) == 0
    best = run / "checkpoints" / "best.pt"
    st = load_checkpoint(best)
    st["best"] = {"seg_miou": 2.0, "iter": 4}
    save_checkpoint(best, st)
    tr = Trainer(load_config(run / "config.yaml"), run, resume=True)
    assert tr.best == {"seg_miou": 2.0, "iter": 4}
    tr.fit()
    assert load_checkpoint(best)["best"] == {"seg_miou": 2.0, "iter": 4}
    assert main(["train", "--config", "configs/bench/toco.yaml", "--run-dir", str(run), *args, "--stop-at", "1",
                 "--overwrite"]) == 0  # fmt: skip
    assert not best.exists()  # a fresh run in the directory drops the earlier run's best.pt


def test_safetensors_export_reloads_to_the_same_predictions(run, demo_root, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    assert main(["export", str(run), "--format", "safetensors", "--out", str(out)]) == 0
    img = sorted((demo_root / "JPEGImages").glob("*.jpg"))[0]
    a, b = wsss.load(run, device="cpu").predict(img), wsss.load(out, device="cpu").predict(img)
    assert np.array_equal(a.probs, b.probs) and a.classes == b.classes
    assert main(["export", str(run), "--format", "safetensors", "--out", str(out)]) == 1  # never replaced
    assert f"{out}: exists" in capsys.readouterr().err


def test_onnx_export_equals_pytorch_at_any_batch_and_size(run, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime does not install here: no ONNX parity check")
    pytest.importorskip("onnxscript", reason="onnxscript (torch.onnx's exporter) does not install here")
    from wsss.api import load_run
    from wsss.export import SegNetwork

    out = tmp_path / "m.onnx"
    assert main(["export", str(run), "--format", "onnx", "--out", str(out)]) == 0
    assert "dynamic batch, height, width" in capsys.readouterr().out
    net = SegNetwork(load_run(run, device="cpu")[1])
    sess = ort.InferenceSession(str(out))
    meta = sess.get_modelmeta().custom_metadata_map
    assert json.loads(meta["seg_classes"]) == ["background", "boat", "car", "cat", "flower", "person"]
    g = torch.Generator().manual_seed(0)
    for shape in [(1, 3, 48, 48), (3, 3, 64, 80), (2, 3, 37, 53)]:  # 37 x 53: not multiples of the patch
        x = torch.rand(*shape, generator=g)
        with torch.no_grad():
            want = net(x).numpy()
        got = sess.run(None, {"image": x.numpy()})[0]
        assert got.shape == want.shape == (shape[0], 6, *shape[2:])
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_torchscript_export_equals_pytorch_at_its_traced_size(run, tmp_path):
    from wsss.api import load_run
    from wsss.export import SegNetwork

    out = tmp_path / "m.pt"
    assert main(["export", str(run), "--format", "torchscript", "--out", str(out), "--size", "48", "64"]) == 0
    extra = {"traced_size.txt": "", "any_size.txt": ""}
    ts = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["traced_size.txt"]) == [48, 64]
    net = SegNetwork(load_run(run, device="cpu")[1])
    x = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        np.testing.assert_allclose(ts(x).numpy(), net(x).numpy(), atol=1e-5)
    assert json.loads(extra["any_size.txt"]) is True  # checked at a second size by the export
    for shape in [(1, 3, 64, 80), (1, 3, 37, 53)]:  # other sizes, one not a patch multiple
        x = torch.rand(*shape, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            np.testing.assert_allclose(ts(x).numpy(), net(x).numpy(), atol=1e-5)
