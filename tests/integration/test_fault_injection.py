"""The fault-injection command (`make faults`) on its smallest useful form: two trials whose four SIGKILLs
cover the four moments (a random step, a checkpoint write, a metrics.jsonl append, the final evaluation)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import fault_injection  # noqa: E402


@pytest.mark.slow
def test_runs_killed_at_every_moment_resume_bit_identical(tmp_path, capsys):
    # seed 69 draws a kill after step 1 then inside the first checkpoint write (trial 0), then half-way through
    # the third metrics record and inside the final evaluation (trial 1); each must be a kill of ours
    rc = fault_injection.main(["--trials", "2", "--kills", "2", "--seed", "69", "--modules", "none",
                               "--keep", str(tmp_path / "k")])  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    assert rc == 0, out
    assert out[:2] == ["ok   trial0: killed at step@1, ckpt-write@1: bit-identical",
                       "ok   trial1: killed at log-write@3, final-eval@1: bit-identical"]  # fmt: skip
    assert out[2].startswith("2 of 2 trials bit-identical")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's")
    assert fault_injection.main(["--trials", "1", "--keep", str(tmp_path / "mine")]) == 2  # not its folder
    assert (tmp_path / "mine" / "notes.txt").read_text() == "a user's"


def test_the_comparison_names_what_a_broken_resume_changed(tmp_path):
    """A run directory whose metrics.jsonl repeats an iteration and keeps a torn line, whose weights differ
    and whose final evaluation is missing is reported on each count."""
    import json

    import torch

    ref, run = tmp_path / "ref", tmp_path / "run"
    for d, w, lines in ((ref, 0.0, list(range(1, 7))), (run, 1.0, [1, 2, 3, 3, 4, 5, 6])):
        (d / "checkpoints").mkdir(parents=True)
        torch.save({"iter": 6, "model": {"w": torch.tensor([w])}}, d / "checkpoints" / "last.pt")
        (d / "metrics.jsonl").write_text("".join(json.dumps({"iter": i, "loss": 1.0}) + "\n" for i in lines))
    (ref / "final_eval.json").write_text("{}")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"iter": 7, "lo')
    (run / "checkpoints" / ".last.pt.x.tmp").write_bytes(b"")
    assert fault_injection._compare(ref, run) == [
        "last.pt.model.w differs", "metrics.jsonl line 8 is torn", "metrics.jsonl iterations [1, 2, 3, 3, 4, 5, 6]",
        "final_eval.json missing", "temporary files left: ['.last.pt.x.tmp']"]  # fmt: skip
