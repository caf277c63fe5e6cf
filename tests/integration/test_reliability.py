"""Reliability: an earlier run is never overwritten, a resume always finishes the job, a non-finite step is
skipped instead of poisoning the weights, and bad values are one-line errors."""

import json
import os

import pytest
import torch

from tests.conftest import TINY
from wsss.cli import main

BASE = ["--config", "configs/bench/toco.yaml", *TINY, "--train.max_iters", "4", "--method.seg_warmup", "2",
        "--optim.warmup_iters", "2"]  # fmt: skip


def _args(demo_root, run, *extra):
    return ["train", *BASE, "--data.root", str(demo_root), "--run-dir", str(run), *extra]


def _records(run):
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def _snapshot(run):
    return {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_a_reused_run_directory_needs_resume_or_overwrite(tmp_path, demo_root, capsys):
    run = tmp_path / "run"
    assert main(_args(demo_root, run, "--train.max_iters", "2")) == 0
    (run / "notes.txt").write_text("mine")
    before = _snapshot(run)
    capsys.readouterr()
    assert main(_args(demo_root, run)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{run}: holds an earlier run" in err and "--resume" in err
    assert _snapshot(run) == before  # nothing of the earlier run was touched, not even metrics.jsonl
    (run / "checkpoints" / "my_good_iter.pt").write_bytes(b"a user's")
    assert main(_args(demo_root, run, "--overwrite", "--train.device", "nodevice")) == 2  # refused: nothing removed
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "config.yaml").is_file()
    assert main(_args(demo_root, run, "--overwrite")) == 0
    assert (run / "checkpoints" / "my_good_iter.pt").read_bytes() == b"a user's"
    assert [r["iter"] for r in _records(run) if "loss" in r] == [1, 2, 3, 4]  # the old 1, 2 are gone
    assert (run / "notes.txt").read_text() == "mine"  # --overwrite removes the trainer's files only
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["iter"] == 4


def test_resume_refuses_config_and_an_empty_directory(tmp_path, demo_root, capsys):
    run = tmp_path / "run"
    assert main(_args(demo_root, run, "--train.max_iters", "2")) == 0
    assert main(["train", "--resume", str(run), "--config", "configs/bench/toco.yaml"]) == 2  # usage
    assert "--resume continues a run with its own config.yaml" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["train", "--resume", str(tmp_path / "empty")]) == 1
    assert "config.yaml: no run to resume here" in capsys.readouterr().err


def test_resume_after_a_kill_logs_each_iteration_once_and_cleans_up(tmp_path, demo_root):
    """Killed after iteration 3 was logged but before its checkpoint, during a checkpoint write (an orphan
    temporary file) and in the middle of a metrics line: the resume starts from iteration 2's checkpoint,
    drops what it will log again, removes only its own temporary files and writes the final evaluation."""
    run = tmp_path / "run"
    assert main(_args(demo_root, run, "--train.ckpt_every", "2", "--train.keep_last", "3", "--stop-at", "3")) == 0
    ck = run / "checkpoints"
    assert sorted(p.name for p in ck.glob("iter_*.pt")) == ["iter_000002.pt", "iter_000003.pt"]
    os.replace(ck / "iter_000002.pt", ck / "last.pt")  # as if the kill came before iteration 3's checkpoint
    (ck / "iter_000003.pt").unlink()
    (ck / ".last.pt.k1ll3d.tmp").write_bytes(b"half a checkpoint")
    (ck / ".my_notes.tmp").write_text("a user's file")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"iter": 4, "lo')  # torn by the kill
    assert main(["train", "--resume", str(run)]) == 0
    recs = _records(run)
    assert [r["iter"] for r in recs if "loss" in r] == [1, 2, 3, 4]
    assert [r["iter"] for r in recs if "split" in r] == [4]
    assert not (ck / ".last.pt.k1ll3d.tmp").exists() and (ck / ".my_notes.tmp").read_text() == "a user's file"
    assert (run / "final_eval.json").is_file()


def test_resume_writes_a_missing_final_evaluation_once_and_keeps_a_written_one(tmp_path, demo_root):
    run = tmp_path / "run"
    assert main(_args(demo_root, run)) == 0
    (run / "final_eval.json").unlink()  # killed during the final evaluation, after its metrics record
    assert main(["train", "--resume", str(run)]) == 0
    final = json.loads((run / "final_eval.json").read_text())
    assert [r["iter"] for r in _records(run) if "split" in r] == [4]
    before = _snapshot(run)
    assert main(["train", "--resume", str(run)]) == 0  # finished: nothing is trained, evaluated or rewritten
    assert _snapshot(run) == before and json.loads((run / "final_eval.json").read_text()) == final


class _Poison(torch.nn.Module):
    """The method with its loss made NaN at the given 0-based iterations."""

    def __init__(self, method, bad):
        super().__init__()
        self.method, self.bad = method, set(bad)

    def forward(self, batch, it):
        out = self.method(batch, it)
        if it in self.bad:
            out.loss = out.loss * float("nan")
        return out


def _trainer(demo_root, run, *extra):
    from wsss.config import load_config
    from wsss.engine.trainer import Trainer

    cfg = load_config("configs/bench/stcl.yaml", [*BASE[2:], "--data.root", str(demo_root), "--train.ckpt_every", "1",
                      "--train.keep_last", "10", "--method.temporal_contrast.enqueue_thre", "0", *extra])  # fmt: skip
    return Trainer(cfg, run)


def test_a_non_finite_step_is_skipped_weights_and_banks_unchanged(tmp_path, demo_root, caplog):
    from wsss.engine.hooks import Hook

    class Record(Hook):  # a user's own after-step behaviour, added without touching the loop
        def __init__(self):
            self.seen = []

        def after_step(self, trainer, step, end):
            self.seen.append((step.it, step.taken))

    tr = _trainer(demo_root, tmp_path / "run")
    tr.model = _Poison(tr.method, bad=[1])
    tr.hooks.append(rec := Record())
    tr.fit()
    assert rec.seen == [(1, True), (2, False), (3, True), (4, True)]
    ck = tmp_path / "run" / "checkpoints"
    a, b, c = (torch.load(ck / f"iter_00000{i}.pt", weights_only=True) for i in (1, 2, 3))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # iteration 2 changed nothing
    assert not all(torch.equal(b["model"][k], c["model"][k]) for k in b["model"])  # iteration 3 trained again
    assert a["optimizer"]["state"][0]["step"] == b["optimizer"]["state"][0]["step"] == 1
    count = "mods.temporal_contrast.bank.count"
    assert a["model"][count].sum() > 0 and torch.equal(a["model"][count], b["model"][count])  # nothing queued
    assert c["model"][count].sum() > b["model"][count].sum()
    warn = [r.getMessage() for r in caplog.records if "step skipped" in r.getMessage()]
    assert len(warn) == 1 and warn[0].startswith("iteration 2: ")
    assert "loss nan" in warn[0] and "images train_" in warn[0]
    assert [r.get("skipped_steps") for r in _records(tmp_path / "run") if "loss" in r] == [None, 1, 1, 1]


def test_consecutive_non_finite_steps_stop_the_run_with_the_last_finite_checkpoint(tmp_path, demo_root, capsys):
    from wsss.engine.guard import TrainingError

    run = tmp_path / "run"
    tr = _trainer(demo_root, run, "--train.nan_patience", "2")
    tr.model = _Poison(tr.method, bad=[1, 2])
    with pytest.raises(TrainingError) as e:
        tr.fit()
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and msg.startswith("iteration 3: 2 optimizer steps in a row")
    assert f"{run / 'checkpoints' / 'last.pt'} (iteration 2)" in msg  # iteration 2 was skipped: weights of 1
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["iter"] == 2  # nothing after the stop


def test_weights_that_went_non_finite_are_never_saved(tmp_path, demo_root):
    """A parameter turned NaN after iteration 3's step (finite loss and gradients until then): the checkpoint
    of iteration 3 is refused with one line naming the last good one, which stays iteration 2's."""
    from wsss.engine.guard import TrainingError
    from wsss.engine.hooks import Hook

    class Corrupt(Hook):
        def after_step(self, trainer, step, end):
            if step.it == 3:
                with torch.no_grad():
                    next(trainer.method.parameters()).fill_(float("nan"))

    run = tmp_path / "run"
    tr = _trainer(demo_root, run)
    tr.hooks.insert(0, Corrupt())  # before the checkpoint hook
    with pytest.raises(TrainingError) as e:
        tr.fit()
    assert str(e.value).startswith("iteration 3: the weights hold NaN or Inf; not saved")
    assert f"{run / 'checkpoints' / 'last.pt'} (iteration 2)" in str(e.value)
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["iter"] == 2
    assert not (run / "checkpoints" / "iter_000003.pt").exists()


def test_save_rotating_keeps_the_newest_and_links_last(tmp_path):
    from wsss.engine.checkpoint import save_rotating

    (tmp_path / "iter_best.pt").write_bytes(b"a user's")
    for it in (1, 999999, 1000000):  # 7 digits sort before 6 as text
        save_rotating(tmp_path, {"iter": it}, it, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_1000000.pt",
                                                         "iter_999999.pt", "iter_best.pt", "last.pt"]  # fmt: skip
    assert os.path.samefile(tmp_path / "last.pt", tmp_path / "iter_1000000.pt")
    save_rotating(tmp_path / "one", {"iter": 1}, 1, keep=1)
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["last.pt"]


@pytest.mark.parametrize("key,value", [("train.log_every", "0"), ("train.ckpt_every", "0"), ("train.max_iters", "0"),
                                       ("data.crop_size", "0"), ("optim.lr", "-1"), ("train.keep_last", "0"),
                                       ("data.scale_range", "[2.0,1.0]")])  # fmt: skip
def test_bad_values_are_one_line_errors_before_training(tmp_path, demo_root, capsys, key, value):
    run = tmp_path / "run"
    assert main(_args(demo_root, run, f"--{key}", value)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and key in err and not run.exists()


class Payload:
    """A pickled object: loading it would run code."""


def _bad_checkpoints(tmp_path, good):
    import copy

    st = torch.load(good, weights_only=True)
    other = copy.deepcopy(st)
    k = "cam_head.conv.weight"
    other["model"][k] = torch.zeros(7, *other["model"][k].shape[1:])  # another class count
    cases = {"empty": (b"", "empty file (0 bytes)"), "bare": (st["model"], "no 'model' weights"),
             "pickled": ({"model": {}, "x": Payload()}, "not a readable wsss checkpoint"),
             "other": (other, f"its weights do not fit this model (0 missing, 0 unexpected, 1 of another shape; '{k}'"),
             "text": (b"not a checkpoint", "not a readable wsss checkpoint")}  # fmt: skip
    for name, (obj, _) in cases.items():
        if isinstance(obj, bytes):
            (tmp_path / f"{name}.pt").write_bytes(obj)
        else:
            torch.save(obj, tmp_path / f"{name}.pt")
    return cases


def test_bad_checkpoints_are_one_line_errors(tmp_path, tiny_toco_run, capsys):
    import shutil

    cases = _bad_checkpoints(tmp_path, tiny_toco_run / "checkpoints" / "last.pt")
    for name, (_, expected) in cases.items():
        run = tmp_path / name / "run"
        (run / "checkpoints").mkdir(parents=True)
        shutil.copy(tiny_toco_run / "config.yaml", run / "config.yaml")
        shutil.copy(tmp_path / f"{name}.pt", run / "checkpoints" / "last.pt")
        for argv in (["evaluate", str(run)], ["train", "--resume", str(run)]):
            assert main(argv) == 1, (name, argv)
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and expected in err and str(run / "checkpoints" / "last.pt") in err, err


def test_recipe_and_section_errors_are_one_line(tmp_path, demo_root, capsys):
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\ntrain:\n  max_iters: 2\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    (tmp_path / "latin1.yaml").write_bytes("# caf\xe9\ntrain:\n  max_iters: 2\n".encode("latin-1"))
    cases = [(["--config", str(tmp_path / "a.yaml")], "_base_ cycle (a.yaml -> b.yaml -> a.yaml)"),
             (["--config", str(tmp_path / "latin1.yaml")], "not UTF-8 text (byte 5)"),
             ([*BASE, "--train", "5"], "config key 'train' is a section"),
             ([*BASE, "--method", "toco"], "config key 'method' is a section"),
             ([*BASE, "--train.device", "cuda:7" if torch.cuda.is_available() else "cuda"], "'train.device'"),
             ([*BASE, "--train.device", "gpu"], "unknown device 'gpu'")]  # fmt: skip
    for argv, expected in cases:
        assert main(["train", *argv, "--data.root", str(demo_root), "--run-dir", str(tmp_path / "r")]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "r").exists()


def _bomb_png(path, side=20000):
    """A PNG whose header declares side x side RGB pixels (a few bytes on disk)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) +
                     chunk(b"IEND", b""))  # fmt: skip


def test_a_decompression_bomb_is_a_one_line_error_everywhere(tmp_path, tiny_toco_run, capsys):
    from PIL import Image

    root = tmp_path / "f"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (48, 48), (10, 90, 200)).save(root / "images" / "ok.jpg")
    bomb = root / "images" / "bomb.png"
    _bomb_png(bomb)
    (root / "tags.csv").write_text("image,tags\nok.jpg,dog\nbomb.png,cat\n")
    expected = f"{bomb}: its header declares 400 M pixels, over Pillow's limit"
    main(["data", "check", str(root)])
    assert expected in capsys.readouterr().out
    assert main(["predict", str(tiny_toco_run), str(bomb), "--out", str(tmp_path / "p")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err


def test_mask_values_outside_the_classes_are_named_not_dropped(tmp_path, demo_root, tiny_toco_run, capsys):
    import shutil

    import numpy as np

    from wsss.data.io import read_mask, write_mask

    root = tmp_path / "demo"
    shutil.copytree(demo_root, root)
    name = (root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[0]
    path = root / "SegmentationClass" / f"{name}.png"
    m = read_mask(path).copy()
    m[:2, :3] = 50  # 6 classes: 50 is no class
    write_mask(path, m, [0] * 768)
    expected = f"{path}: mask values 50 are not class indices (0-5, 255 ignored): 6 pixels"
    main(["data", "check", str(root)])
    assert expected in capsys.readouterr().out
    assert main(["evaluate", str(tiny_toco_run), "--data.root", str(root)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err
    assert np.array_equal(read_mask(path)[:2, :3], np.full((2, 3), 50))  # the input is not touched


def test_train_checks_every_header_before_iteration_one(tmp_path, demo_root, capsys, caplog):
    """A missing train image and a text file named .jpg in the val split: both listed, the run refused
    before a directory is made (not when the loader or the final evaluation reaches them)."""
    import shutil

    root = tmp_path / "demo"
    shutil.copytree(demo_root, root)
    sets = root / "ImageSets" / "Segmentation"
    gone = root / "JPEGImages" / f"{(sets / 'train.txt').read_text().split()[-1]}.jpg"
    text = root / "JPEGImages" / f"{(sets / 'val.txt').read_text().split()[0]}.jpg"
    gone.unlink()
    text.write_text("not an image")
    run = tmp_path / "run"
    assert main(["train", *BASE, "--data.root", str(root), "--run-dir", str(run), "--train.eval_every", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"wsss: error: {gone}: image file is missing (and 1 more, listed above)")
    logged = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(logged) == 2 and f"{text}: corrupt or unreadable image" in logged[1]
    assert not run.exists()


def test_an_image_broken_during_training_is_skipped_up_to_the_limit(tmp_path, demo_root, capsys, caplog):
    """A JPEG truncated after the start-up check (its header still reads) is replaced by the next image
    with a warning naming it; with data.max_bad_images 0 the run stops with one line instead."""
    import shutil

    root = tmp_path / "demo"
    shutil.copytree(demo_root, root)
    name = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[0]
    jpg = root / "JPEGImages" / f"{name}.jpg"
    jpg.write_bytes(jpg.read_bytes()[:-600])  # the header survives, the pixels do not
    args = ["train", *BASE, "--data.root", str(root), "--train.eval_every", "-1"]
    assert main([*args, "--run-dir", str(tmp_path / "a")]) == 0  # 4 iterations x 2: every train image once
    warned = [r.getMessage() for r in caplog.records if "skipped, the next image" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith(f"{jpg}: corrupt or unreadable image")
    capsys.readouterr()
    assert main([*args, "--run-dir", str(tmp_path / "b"), "--data.max_bad_images", "0"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{jpg}: corrupt or unreadable image" in err


def test_an_unwritable_output_is_refused_before_the_work(tmp_path, demo_root, tiny_toco_run, capsys, monkeypatch):
    import wsss.evaluation.evaluators as ev

    blocker = tmp_path / "file.txt"
    blocker.write_text("a file where a folder is asked for")
    monkeypatch.setattr(ev, "run_evaluation", lambda *a, **k: pytest.fail("evaluated before checking the output"))
    assert main(["evaluate", str(tiny_toco_run), "--out", str(blocker / "eval.json")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{blocker}: cannot write output there" in err
    assert main(_args(demo_root, blocker / "run")) == 1
    assert f"{blocker / 'run'}: cannot write output there" in capsys.readouterr().err
    assert blocker.read_text() == "a file where a folder is asked for"


def _tagged(root, text: bytes, files=("a.jpg", "b.jpg")):
    from PIL import Image

    (root / "images").mkdir(parents=True)
    for f in files:
        Image.new("RGB", (8, 8), (10, 20, 30)).save(root / "images" / f)
    (root / "tags.csv").write_bytes(text)
    return root


def test_tags_csv_from_a_spreadsheet(tmp_path, caplog):
    """A UTF-8 BOM is read; a repeated row is read once with a warning; a row that contradicts an earlier one,
    tags that differ only in case (without classes.txt) and a non-UTF-8 file are one-line errors naming the
    file (and lines); files in images/ that tags.csv does not list are counted."""
    from wsss.data.check import check_root
    from wsss.data.datasets.folder import read_folder
    from wsss.data.io import DataError

    ok = _tagged(tmp_path / "bom", "\ufeffimage,tags\na.jpg,dog\nb.jpg,cat;dog\na.jpg,dog\n".encode(),
                 files=("a.jpg", "b.jpg", "c.jpg"))  # fmt: skip
    items, classes = read_folder(ok, None, None, no_background=False)
    assert [(it.name, it.tags) for it in items] == [("a", ("dog",)), ("b", ("cat", "dog"))]
    assert classes.names == ("cat", "dog")
    logged = " | ".join(r.getMessage() for r in caplog.records)
    assert "tags.csv:4: a.jpg repeats line 2; read once" in logged
    assert "1 file(s) in images/ not in tags.csv are not used (e.g. c.jpg)" in logged
    report = [m for _, m in check_root(ok)]
    assert any("a.jpg repeats line 2" in m for m in report) and any("not in tags.csv" in m for m in report)
    cases = {
        "conflict": (b"image,tags\na.jpg,dog\nb.jpg,cat\na.jpg,cat\n",
                     "tags.csv:4: a.jpg is listed again with other tags (cat here, dog on line 2)"),
        "case": (b"image,tags\na.jpg,Cat\nb.jpg,cat\n", "tags.csv: tags that differ only in case: Cat/cat"),
        "latin1": ("image,tags\na.jpg,caf\xe9\n".encode("latin-1"), "tags.csv: not UTF-8 text (byte 20)"),
        "outside": (b"image,tags\n../x.jpg,dog\n", "tags.csv:2: '../x.jpg' is not a file name under images/"),
        "no name": (b"image,tags\n,dog\n", "tags.csv:2: '' is not a file name under images/"),
    }  # fmt: skip
    for name, (text, expected) in cases.items():
        root = _tagged(tmp_path / name, text)
        with pytest.raises(DataError) as e:
            read_folder(root, None, None, no_background=False)
        assert len(str(e.value).splitlines()) == 1 and expected in str(e.value), name
        assert any(expected in m for _, m in check_root(root)), name
    (tmp_path / "case" / "classes.txt").write_text("Cat\ncat\n")  # two classes, on purpose: allowed
    assert read_folder(tmp_path / "case", None, None, no_background=False)[1].names == ("Cat", "cat")


def test_a_one_pixel_image_at_half_scale(tmp_path, tiny_toco_run):
    from PIL import Image

    from wsss.data.io import read_mask

    Image.new("RGB", (1, 1), (200, 30, 30)).save(tmp_path / "dot.png")
    out = tmp_path / "p"
    assert main(["predict", str(tiny_toco_run), str(tmp_path / "dot.png"), "--out", str(out),
                 "--eval.scales", "[1.0,0.5]", "--save-cams"]) == 0  # fmt: skip
    assert read_mask(out / "dot.png").shape == (1, 1)


def test_a_skipped_step_under_fp16_with_clipping_does_not_break_the_next(tmp_path, demo_root):
    """fp16's scaler after a skipped step whose gradients were unscaled for clipping: the next step runs, and the
    scale is backed off."""
    tr = _trainer(demo_root, tmp_path / "run", "--train.amp", "fp16", "--optim.grad_clip", "1.0", "--train.device",
                  "cpu")  # fmt: skip
    tr.model = _Poison(tr.method, bad=[1])
    scale = tr.scaler.get_scale() if tr.scaler.is_enabled() else None
    tr.fit()
    if scale is not None:
        assert tr.scaler.get_scale() < scale
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["iter"] == 4


def test_a_split_of_unreadable_images_stops_instead_of_looping(tmp_path, demo_root):
    from wsss.build import build_dataset
    from wsss.config import load_config
    from wsss.data.io import DataError

    cfg = load_config("configs/bench/toco.yaml", [*BASE[2:], "--data.root", str(demo_root)])
    ds = build_dataset(cfg, "train", train=True, load_masks=False)
    for it in ds.items:
        object.__setattr__(it, "image", tmp_path / f"gone_{it.name}.jpg")
    ds.skip_bad = 100
    with pytest.raises(DataError, match="none of the 8 images could be read"):
        ds[0]
