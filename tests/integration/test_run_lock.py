"""A run directory is written by one process at a time, a resume never shortens a schedule it already ran
past or skips an evaluation it was killed in, and a read-only output is one line before any work."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from tests.integration.test_reliability import BASE, _args, _records, _snapshot
from wsss.cli import main

HOLD = """
import fcntl, sys, time
f = open(sys.argv[1], "a+")
fcntl.lockf(f, fcntl.LOCK_EX)
f.write("4242\\n"); f.flush()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_run_directory_being_written_by_another_process_is_refused(tmp_path, demo_root, capsys):
    run = tmp_path / "run"
    assert main(_args(demo_root, run, "--train.max_iters", "2")) == 0
    assert not (run / ".wsss.lock").exists()  # released, and removed, at the end of the run
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run / ".wsss.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _snapshot(run)
        capsys.readouterr()
        for argv in (["train", "--resume", str(run), "--train.max_iters", "4"], _args(demo_root, run, "--overwrite")):
            assert main(argv) == 1
            err = capsys.readouterr().err.strip()
            assert err == (f"wsss: error: {run}: another wsss process (pid 4242) is writing this run; wait for it to "
                           "end or stop it, then run again")  # fmt: skip
            assert _snapshot(run) == before  # no temporary removed, no line cut, nothing overwritten
    finally:
        holder.kill()
        holder.wait()
    assert main(["train", "--resume", str(run), "--train.max_iters", "4"]) == 0  # the holder's end frees it
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["iter"] == 4


def test_a_resume_below_the_checkpoint_iteration_is_refused(tmp_path, demo_root, capsys):
    run = tmp_path / "run"
    assert main(_args(demo_root, run)) == 0
    before = _snapshot(run)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--train.max_iters", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"wsss: error: config key 'train.max_iters': 3 is below iteration 4 of "
                   f"{run / 'checkpoints' / 'last.pt'}; a resumed run keeps or lengthens its schedule")  # fmt: skip
    assert _snapshot(run) == before


def test_an_evaluation_interrupted_after_its_checkpoint_runs_on_resume(tmp_path, demo_root, monkeypatch):
    """Killed inside the evaluation of iteration 2 (its checkpoint already written): the resume evaluates
    iteration 2 before training on, so metrics.jsonl, best.pt and the weights are the uninterrupted run's."""
    import wsss.engine.trainer as tr

    every = ["--train.eval_every", "2", "--train.ckpt_every", "2"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(_args(demo_root, ref, *every)) == 0
    real = tr.run_evaluation

    def killed(*a, **k):
        raise KeyboardInterrupt  # what a Ctrl-C inside the evaluation leaves

    monkeypatch.setattr(tr, "run_evaluation", killed)
    with pytest.raises(KeyboardInterrupt):
        main(_args(demo_root, run, *every))
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["iter"] == 2
    assert [r["iter"] for r in _records(run) if "split" in r] == []
    monkeypatch.setattr(tr, "run_evaluation", real)
    assert main(["train", "--resume", str(run)]) == 0

    def evals(d):
        return [r for r in _records(d) if "split" in r]

    assert [r["iter"] for r in evals(run)] == [2, 4] and evals(run) == evals(ref)
    a, b = (torch.load(d / "checkpoints" / "last.pt", weights_only=True)["model"] for d in (ref, run))
    assert all(torch.equal(a[k], b[k]) for k in a)
    a, b = (torch.load(d / "checkpoints" / "best.pt", weights_only=True)["best"] for d in (ref, run))
    assert a == b
    assert json.loads((run / "final_eval.json").read_text()) == json.loads((ref / "final_eval.json").read_text())


def _without_override(argv: list[str]) -> list[str]:
    """``argv`` run by a process that may not write where its mode bits forbid it (root without the
    permission-override capabilities); non-root users need nothing."""
    if os.geteuid() != 0:
        return argv
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: a read-only directory cannot be made read-only for us")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", *argv]


@pytest.mark.slow  # two fresh interpreters (about 12 s)
def test_a_read_only_output_directory_is_one_line_before_any_work(tiny_toco_run, demo_root):
    """Mode bits, not a file in the way: ``evaluate --out`` into a read-only folder and ``train --run-dir``
    under it fail with one line naming the folder, before anything is computed or created."""
    base = Path(tempfile.mkdtemp())
    try:
        ro = base / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        cases = (
            (["evaluate", str(tiny_toco_run), "--out", str(ro / "eval.json")], f"{ro}/"),
            (["train", *BASE, "--data.root", str(demo_root), "--run-dir", str(ro / "run")], f"{ro / 'run'}: "),
        )
        for argv, where in cases:
            p = subprocess.run(_without_override([sys.executable, "-m", "wsss", *argv]), capture_output=True,
                               text=True, env=env, timeout=300)  # fmt: skip
            err = p.stderr.strip().splitlines()
            assert p.returncode == 1, p.stderr
            assert err[-1].startswith(f"wsss: error: {where}") and err[-1].endswith(
                "cannot write output there (Permission denied)"), err  # fmt: skip
            assert "Traceback" not in p.stderr and "evaluating" not in p.stderr
        assert list(ro.iterdir()) == []
    finally:
        (base / "ro").chmod(0o755)
        shutil.rmtree(base)
