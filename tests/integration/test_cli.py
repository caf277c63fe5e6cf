"""End-to-end CLI runs on tiny demo data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from wsss.cli import main


def _train(tmp_path, name, tiny_args, *extra):
    run = tmp_path / name
    rc = main(["train", "--config", "configs/bench/toco.yaml", "--run-dir", str(run), *tiny_args,
               "--train.max_iters", "4", "--method.seg_warmup", "2", "--optim.warmup_iters", "2", *extra])  # fmt: skip
    assert rc == 0
    return run


def test_train_writes_run_dir_and_evaluate(tmp_path, tiny_args, capsys):
    run = _train(tmp_path, "a", tiny_args)
    for f in ("config.yaml", "env.json", "metrics.jsonl", "checkpoints/last.pt", "final_eval.json"):
        assert (run / f).is_file(), f
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    assert [r["iter"] for r in steps] == [1, 2, 3, 4]
    assert {"cls", "aux_cls", "ptc"} <= set(steps[0]) and "seg" in steps[-1]
    assert json.loads((run / "env.json").read_text())["weights_source"].startswith("none")
    assert main(["evaluate", str(run), "--split", "val"]) == 0
    res = json.loads((run / "eval_val.json").read_text())
    assert set(res["results"]) == {"seg", "cam", "pseudo"} and res["images"] == 4
    assert "oracle_sweep" in res["results"]["cam"]
    assert "mIoU" in capsys.readouterr().out


# Every module of the five methods stacked (FSR's teacher last: it copies all the others). The banks
# only fill where class probabilities pass enqueue_thre: 0 makes the tiny run write them (and so the
# RCA aggregation runs on a non-empty bank from step 2).
STACK = ["--method.modules", "[cf_bilstm, class_tokens, spatial_contrast, temporal_contrast, region_memory, "
         "region_contrast, region_aggregation, context_aggregation, feature_fusion, ema_teacher, uncertain_masking, "
         "self_enhancement]",
         "--method.temporal_contrast.enqueue_thre", "0", "--method.temporal_contrast.min_entries", "1",
         "--method.region_memory.enqueue_thre", "0", "--method.feature_fusion.layers", "[1]",
         "--method.ema_teacher.out_dim", "64", "--method.ema_teacher.hidden", "32",
         "--method.ema_teacher.bottleneck", "16", "--method.uncertain_masking.block", "1",
         "--method.ema_teacher.momentum", "0.9"]  # fmt: skip
BANKS = ("mods.temporal_contrast.bank.count", "mods.region_memory.bank.count",
         "mods.ema_teacher.teacher.mods.region_memory.bank.count")  # fmt: skip


@pytest.mark.parametrize("modules", [[], STACK], ids=["toco", "all_modules"])
def test_resume_gives_same_weights_as_uninterrupted(tmp_path, tiny_args, modules):
    full = _train(tmp_path, "full", tiny_args, *modules)
    part = tmp_path / "part"
    assert main(["train", "--config", "configs/bench/toco.yaml", "--run-dir", str(part), *tiny_args,
                 "--train.max_iters", "4", "--method.seg_warmup", "2", "--optim.warmup_iters", "2",
                 "--stop-at", "2", *modules]) == 0  # fmt: skip
    assert torch.load(part / "checkpoints" / "last.pt", weights_only=True)["iter"] == 2
    assert main(["train", "--resume", str(part)]) == 0
    a = torch.load(full / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(part / "checkpoints" / "last.pt", weights_only=True)
    assert b["iter"] == 4
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    if modules:  # the memory banks are part of the checkpoint and were written in both halves
        assert all(int(a["model"][k].sum()) > 0 for k in BANKS)


def test_bad_input_is_one_line_error(tmp_path, capsys):
    rc = main(["train", "--config", "configs/bench/toco.yaml", "--data.root", str(tmp_path / "missing")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and "missing: data root does not exist" in err
    rc = main(["train", "--config", "configs/bench/toco.yaml", "--train.max_iterz", "3"])
    assert rc == 2 and "train.max_iterz" in capsys.readouterr().err
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("method:\n  name: toco\n")
    (run / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    assert main(["evaluate", str(run)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "last.pt: not a readable wsss checkpoint" in err


def test_data_demo_and_check(tmp_path, capsys):
    assert main(["data", "demo", "--out", str(tmp_path / "d"), "--n-train", "3", "--n-val", "2", "--size", "48"]) == 0
    assert main(["data", "check", str(tmp_path / "d")]) == 0
    assert "0 errors" in capsys.readouterr().out
    assert main(["list", "methods"]) == 0
    assert {"toco", "fully_supervised"} <= set(capsys.readouterr().out.split())


@pytest.mark.slow
def test_torchrun_two_processes_match_single_process_accumulation(tmp_path, tiny_args):
    """2 gloo processes x micro-batch 1 == 1 process x 2 accumulated micro-batches of 1, with every
    pipeline module on: memory banks, FSR centres and the EMA teacher equal the accumulated ones."""
    common = ["--config", "configs/bench/toco.yaml", *tiny_args, "--train.max_iters", "2",
              "--method.seg_warmup", "1", "--train.micro_batch", "1", *STACK]  # fmt: skip
    assert main(["train", "--run-dir", str(tmp_path / "one"), *common]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "wsss", "train", "--run-dir", str(tmp_path / "two"), *common]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a = torch.load(tmp_path / "one" / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "two" / "checkpoints" / "last.pt", weights_only=True)["model"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5, rtol=1e-4), k
    assert all(int(a[k].sum()) > 0 for k in BANKS)
    assert json.loads((tmp_path / "two" / "env.json").read_text())["world_size"] == 2


def test_tensorboard_scalars_and_prediction_grid(tmp_path, tiny_args):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = _train(tmp_path, "tb", tiny_args, "--train.tensorboard", "true")
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert {"train/loss", "train/cls", "seg_miou", "cam_miou"} <= set(acc.Tags()["scalars"])
    img = acc.Images("val/predictions")[0]
    assert img.width == 5 * 64  # image | CAM | pseudo label | seg | ground truth, 64 px demo images


def test_corrupt_image_in_a_worker_is_a_one_line_error(tmp_path, capsys):
    from wsss.data.synthetic import DemoConfig, generate

    root = generate(tmp_path / "d", DemoConfig(n_train=2, n_val=1, size=48))
    bad = root / "JPEGImages" / "train_00001.jpg"
    bad.write_bytes(b"not a jpeg")
    rc = main(["train", "--config", "configs/bench/toco.yaml", "--data.root", str(root), "--model.backbone",
               "test_vit", "--model.weights", "none", "--data.crop_size", "48", "--data.num_workers", "1",
               "--train.batch_size", "2", "--train.max_iters", "1", "--run-dir", str(tmp_path / "r")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith("wsss: error: ") and f"{bad}: corrupt or unreadable image" in err[-1]


def test_training_without_any_masks_when_evaluation_is_off(tmp_path):
    """A user with tags only (no masks anywhere) can train with train.eval_every -1."""
    from PIL import Image

    root = tmp_path / "f"
    (root / "images").mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (48, 48), (40 * i, 90, 200)).save(root / "images" / f"{i}.jpg")
    (root / "tags.csv").write_text("image,tags\n0.jpg,dog\n1.jpg,cat;dog\n")
    run = tmp_path / "run"
    rc = main(["train", "--config", "configs/bench/toco.yaml", "--data.dataset", "folder", "--data.root", str(root),
               "--model.backbone", "test_vit", "--model.weights", "none", "--data.crop_size", "48",
               "--data.num_workers", "0", "--train.batch_size", "2", "--train.max_iters", "2",
               "--train.eval_every", "-1", "--run-dir", str(run)])  # fmt: skip
    assert rc == 0 and (run / "checkpoints" / "last.pt").is_file() and not (run / "final_eval.json").exists()


def test_demo_entry_point_with_overrides(tmp_path, demo_root, capsys):
    """`python -m wsss.demo` passes dotted overrides to both runs and prints the summary table."""
    from wsss.demo import main as demo_main

    rc = demo_main(["--data", str(demo_root), "--out", str(tmp_path / "out"), "--model.backbone", "test_vit",
                    "--model.weights", "none", "--data.crop_size", "48", "--data.num_workers", "0",
                    "--train.max_iters", "1", "--train.batch_size", "2"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and "toco" in out and "fully_supervised" in out and "all background" in out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary["rows"]) == {"toco", "fully_supervised"}
    assert (tmp_path / "out" / "toco" / "final_eval.json").is_file()


def test_demo_reference_follows_the_weak_recipes_schedule(tmp_path, demo_root):
    """The demo's fully supervised run takes toco's iterations, not the benchmark reference's longer schedule."""
    import yaml

    from wsss.demo import main as demo_main

    confs = tmp_path / "configs"
    confs.mkdir()
    bench = Path("configs/bench").resolve()
    (confs / "toco.yaml").write_text(f"_base_: {bench / 'toco.yaml'}\ntrain: {{max_iters: 2}}\n")
    (confs / "fully_supervised.yaml").write_text(f"_base_: {bench / 'fully_supervised.yaml'}\n")
    rc = demo_main(["--data", str(demo_root), "--out", str(tmp_path / "out"), "--configs", str(confs),
                    "--model.backbone", "test_vit", "--model.weights", "none", "--data.crop_size", "48",
                    "--data.num_workers", "0", "--train.batch_size", "2", "--method.seg_warmup", "1"])  # fmt: skip
    assert rc == 0
    for name in ("toco", "fully_supervised"):
        assert yaml.safe_load((tmp_path / "out" / name / "config.yaml").read_text())["train"]["max_iters"] == 2


def test_predict_writes_palette_masks_and_evaluate_with_crf(tmp_path, tiny_args, demo_root, capsys):
    from PIL import Image

    run = _train(tmp_path, "p", tiny_args)
    imgs = sorted((demo_root / "JPEGImages").glob("*.jpg"))[:2]
    out = tmp_path / "pred"
    # inputs may come before and after the overrides
    assert main(["predict", str(run), str(imgs[0]), "--eval.crf", "torch", str(imgs[1]), "--out", str(out)]) == 0
    for f in imgs:
        with Image.open(out / f"{f.stem}.png") as m, Image.open(f) as im:
            assert m.mode == "P" and m.size == im.size
            assert np.asarray(m).max() < 6  # background + 5 demo classes
    assert main(["predict", str(run), "--split", "val"]) == 0
    assert len(list((run / "predictions" / "val").glob("*.png"))) == 4
    assert main(["predict", str(run), str(tmp_path / "nope.jpg")]) == 1
    assert "nope.jpg: no such image file or directory" in capsys.readouterr().err
    assert main(["evaluate", str(run), "--which", "seg", "--eval.crf", "torch", "--out", str(tmp_path / "e.json")]) == 0
    rep = json.loads((tmp_path / "e.json").read_text())
    assert rep["crf"] == "torch" and 0.0 <= rep["results"]["seg"]["miou"] <= 1.0


@pytest.mark.parametrize(
    "config,extra,loss",
    [("rca", ["--method.region_memory.enqueue_thre", "0", "--method.region_contrast.warmup", "0"], "rca_sc"),
     ("wsfcn", ["--model.backbone", "resnet18", "--model.aux_layer", "-2", "--method.feature_fusion.layers", "[1]"],
      "seg"),
     ("wsfcn", ["--method.context_aggregation.mode", "fca", "--method.context_aggregation.gate_init", "0.5"], "seg"),
     ("fsr", ["--method.uncertain_masking.block", "1"], "fsr_patch"),
     ("stack_lstm_mask_agg", ["--method.region_memory.enqueue_thre", "0", "--method.uncertain_masking.block", "1"],
      "fsr_patch")],
    ids=["rca_vit", "wsfcn_resnet18", "wsfcn_fca", "fsr", "stack"],
)  # fmt: skip
def test_demo_recipes_of_rca_wsfcn_fsr_and_a_stack_train_and_evaluate(tmp_path, tiny_args, config, extra, loss):
    run = tmp_path / config
    assert main(["train", "--config", f"configs/bench/{config}.yaml", "--run-dir", str(run), *tiny_args,
                 "--train.max_iters", "3", "--method.seg_warmup", "1", *extra]) == 0  # fmt: skip
    steps = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert loss in [r for r in steps if "loss" in r][-1]
    assert main(["evaluate", str(run), "--split", "val"]) == 0
    # evaluate reloads the checkpoint: every module's weights must come back for it to match the run's own score
    final = json.loads((run / "final_eval.json").read_text())
    again = json.loads((run / "eval_val.json").read_text())["results"]
    for which in ("cam", "seg"):
        assert again[which]["miou"] == pytest.approx(final[which]["miou"], abs=1e-9)
        assert again[which]["iou"] == pytest.approx(final[which]["iou"], abs=1e-9, nan_ok=True)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_train_and_resume_under_autocast(tmp_path, tiny_args, amp):
    """train.amp's path (autocast, fp16 loss scaling with its scaler state checkpointed), run on CPU."""
    run = _train(tmp_path, amp, tiny_args, "--train.amp", amp, "--stop-at", "2")
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ck["iter"] == 2 and (ck["scaler"] != {}) == (amp == "fp16")  # the scaler is on for fp16 only
    assert main(["train", "--resume", str(run)]) == 0
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ck["iter"] == 4 and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    steps = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["iter"] for r in steps] == [1, 2, 3, 4] and "seg" in steps[-1]
    assert all(np.isfinite(r["loss"]) for r in steps)


def test_print_config_shows_the_merged_recipe(capsys):
    """`--print-config` (and the older `--print_config`) prints the resolved recipe: rca on the bench toco keeps
    toco's method settings (it extends toco); fully_supervised on it starts from its own."""
    for flag in ("--print-config", "--print_config"):
        assert main(["train", "--config", "configs/bench/rca.yaml", flag]) == 0
        out = yaml.safe_load(capsys.readouterr().out)
        method = out["method"]
        assert (method["name"], method["seg_warmup"], method["cam_scales"]) == ("rca", 100, [1.0, 0.5])
    assert main(["train", "--config", "configs/bench/fully_supervised.yaml", "--print-config"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["method"]["name"] == "fully_supervised" and "cam_scales" not in out["method"]
