"""Fault injection: kill training runs at random moments, resume them, and compare with an uninterrupted run.

    python scripts/fault_injection.py [--trials 8] [--seed 0] [--nproc 1] [--modules all] [--keep DIR]
    make faults

A reference run trains a tiny model (``test_vit``, no weights) on generated demo data. Each trial starts the
same run and SIGKILLs it up to ``--kills`` times, each time at a moment drawn from:

- ``step``: from outside, right after a random iteration was logged (the process dies wherever it is);
- ``ckpt-write``: inside a checkpoint write, the temporary file half written, before its rename;
- ``log-write``: inside a metrics.jsonl append, half a line written;
- ``final-eval``: inside the final evaluation;

then ``wsss train --resume``s it until it exits 0. A trial passes when its ``last.pt`` (weights, optimizer,
scaler, memory banks, RNG states) equals the reference's bit for bit, metrics.jsonl has every iteration
once with the reference's losses, ``final_eval.json`` holds the reference's numbers and no temporary file
is left. Exit 0 when every trial passes; one line per trial either way. ``--nproc 2`` runs each training
under torchrun (gloo, CPU). Kills inside a write happen in a child process that patches the writer; the
library itself carries no fault hook.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KINDS = ("step", "ckpt-write", "log-write", "final-eval")
ITERS = 6
RECIPE = ["--config", "configs/bench/toco.yaml", "--model.backbone", "test_vit", "--model.weights", "none",
          "--model.seg_hidden", "16", "--model.drop_path", "0", "--data.crop_size", "48", "--data.num_workers", "0",
          "--train.batch_size", "2", "--train.log_every", "1", "--train.ckpt_every", "2", "--train.keep_last", "2",
          "--train.eval_every", "0", "--train.max_iters", str(ITERS), "--optim.warmup_iters", "2",
          "--method.seg_warmup", "2"]  # fmt: skip
STACK = ["--method.modules", "[cf_bilstm, class_tokens, spatial_contrast, temporal_contrast, region_memory, "
         "region_contrast, region_aggregation, context_aggregation, feature_fusion, ema_teacher, uncertain_masking, "
         "self_enhancement]", "--method.temporal_contrast.enqueue_thre", "0",
         "--method.temporal_contrast.min_entries", "1", "--method.region_memory.enqueue_thre", "0",
         "--method.feature_fusion.layers", "[1]", "--method.ema_teacher.out_dim", "64",
         "--method.ema_teacher.hidden", "32", "--method.ema_teacher.bottleneck", "16",
         "--method.uncertain_masking.block", "1"]  # fmt: skip


def child(kind: str, at: int, argv: list[str]) -> int:
    """Run ``wsss`` with ``argv`` in this process, SIGKILLing it inside the ``at``-th (1-based) write or
    evaluation of ``kind`` (rank 0 only)."""
    from wsss.cli import main

    def die() -> None:
        Path(os.environ["WSSS_FAULT_MARK"]).touch()  # so the parent knows this exit was its kill, under torchrun too
        os.kill(os.getpid(), signal.SIGKILL)

    rank0 = os.environ.get("RANK", "0") == "0"
    calls = {"n": 0}

    def due() -> bool:
        calls["n"] += 1
        return rank0 and calls["n"] == at

    if kind == "ckpt-write":
        import wsss.engine.checkpoint as ck

        real = ck.atomic_write

        def atomic_write(path, write):
            if not due():
                return real(path, write)

            def half(tmp):  # the temporary file exists and is half written when the process dies
                write(tmp)
                with open(tmp, "r+b") as f:
                    f.truncate(os.path.getsize(tmp) // 2)
                die()

            return real(path, half)

        ck.atomic_write = atomic_write
    elif kind == "log-write":
        import wsss.engine.trainer as tr

        real_log = tr.Trainer.log_record

        def log_record(self, rec):
            if due():
                with open(self.run_dir / "metrics.jsonl", "a") as f:
                    line = json.dumps(rec)
                    f.write(line[: len(line) // 2])
                die()
            return real_log(self, rec)

        tr.Trainer.log_record = log_record
    elif kind == "final-eval":
        import wsss.engine.trainer as tr

        real_eval = tr.run_evaluation

        def run_evaluation(*a, **k):
            if due():
                die()
            return real_eval(*a, **k)

        tr.run_evaluation = run_evaluation
    return main(argv)


def _cmd(nproc: int, kind: str, at: int, argv: list[str]) -> list[str]:
    inner = [str(Path(__file__).resolve()), "--child", kind, str(at), "--", *argv]
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *inner]
    return [sys.executable, *inner]


def _env(tmp: Path) -> dict:
    return os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src"),
                         "TMPDIR": str(tmp)}  # fmt: skip


def _logged(run: Path) -> int:
    """The last iteration whose training record is complete in metrics.jsonl (0 when none)."""
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    done = 0
    for ln in lines:
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:
            continue
        if "loss" in rec:
            done = max(done, rec["iter"])
    return done


def _ckpt_iter(run: Path) -> int:
    """The iteration of the run's checkpoints/last.pt (0 when there is none)."""
    import torch

    path = run / "checkpoints" / "last.pt"
    return int(torch.load(path, weights_only=True)["iter"]) if path.is_file() else 0


def _run(cmd: list[str], env: dict, log: Path, kill_after_iter: int = 0, timeout: float = 600) -> tuple[int, bool]:
    """Run ``cmd`` (its output appended to ``log``); with ``kill_after_iter`` > 0, SIGKILL its process group
    once this process has logged that iteration. Returns (exit status, whether it died of our kill)."""
    run = Path(cmd[cmd.index("--run-dir") + 1]) if "--run-dir" in cmd else Path(cmd[cmd.index("--resume") + 1])
    mark = log.with_suffix(".killed")
    mark.unlink(missing_ok=True)
    metrics = run / "metrics.jsonl"
    with open(log, "a") as out:  # a file, not a pipe: a full pipe would block the child
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        launched = time.time()
        p = subprocess.Popen(cmd, cwd=REPO, env=env | {"WSSS_FAULT_MARK": str(mark)}, stdout=out, stderr=out,
                             start_new_session=True)  # fmt: skip
        start = time.monotonic()
        while p.poll() is None:
            # records left by an earlier killed run count only once this run has rewritten the file (resume trims it)
            fresh = metrics.is_file() and metrics.stat().st_mtime > launched
            if kill_after_iter and fresh and _logged(run) >= kill_after_iter:
                mark.touch()
                os.killpg(p.pid, signal.SIGKILL)
            if time.monotonic() - start > timeout:
                os.killpg(p.pid, signal.SIGKILL)
                raise RuntimeError(f"{' '.join(cmd)}: no exit within {timeout} s (a hang); see {log}")
            time.sleep(0.005)
    return p.returncode, mark.is_file()


def _compare(ref: Path, run: Path) -> list[str]:
    """What differs between the reference run directory and a resumed one (empty: nothing)."""
    import torch

    bad = []
    a = torch.load(ref / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(run / "checkpoints" / "last.pt", weights_only=True)

    def walk(x, y, where):
        if torch.is_tensor(x):
            if not (torch.is_tensor(y) and x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)):
                bad.append(f"{where} differs")
        elif isinstance(x, dict):
            if not isinstance(y, dict) or x.keys() != y.keys():
                bad.append(f"{where}: keys differ")
            else:
                for k in x:
                    walk(x[k], y[k], f"{where}.{k}")
        elif isinstance(x, (list, tuple)):
            if not isinstance(y, (list, tuple)) or len(x) != len(y):
                bad.append(f"{where}: lengths differ")
            else:
                for i, (u, v) in enumerate(zip(x, y)):
                    walk(u, v, f"{where}[{i}]")
        elif x != y and not (isinstance(x, float) and x != x and y != y):
            bad.append(f"{where}: {x!r} != {y!r}")

    walk(a, b, "last.pt")
    if (ref / "checkpoints" / "best.pt").is_file():
        if not (run / "checkpoints" / "best.pt").is_file():
            bad.append("best.pt missing")
        else:
            walk(torch.load(ref / "checkpoints" / "best.pt", weights_only=True),
                 torch.load(run / "checkpoints" / "best.pt", weights_only=True), "best.pt")  # fmt: skip

    def steps(r):
        recs = []
        for i, ln in enumerate((r / "metrics.jsonl").read_text().splitlines(), 1):
            try:
                recs.append(json.loads(ln))
            except json.JSONDecodeError:
                bad.append(f"metrics.jsonl line {i} is torn")
        return [{k: v for k, v in rec.items() if k not in ("time", "sec_per_iter", "eta")} for rec in recs]

    sa, sb = steps(ref), steps(run)
    if [r["iter"] for r in sb if "loss" in r] != list(range(1, ITERS + 1)):
        bad.append(f"metrics.jsonl iterations {[r['iter'] for r in sb if 'loss' in r]}")
    elif [r for r in sa if "loss" in r] != [r for r in sb if "loss" in r]:
        bad.append("metrics.jsonl losses differ")
    if not (run / "final_eval.json").is_file():
        bad.append("final_eval.json missing")
    elif json.loads((ref / "final_eval.json").read_text()) != json.loads((run / "final_eval.json").read_text()):
        bad.append("final_eval.json differs")
    if left := [p.name for p in run.rglob("*.tmp")]:
        bad.append(f"temporary files left: {left}")
    return bad[:5]


def trial(ref: Path, run: Path, argv: list[str], rng: random.Random, kills: int, nproc: int, env: dict) -> str:
    """One trial: ``kills`` SIGKILLs at drawn moments, each followed by what a user would run next (``--resume``
    once a checkpoint exists, else the same command with ``--overwrite``), until the run exits 0; returns its
    verdict line."""
    log = run.parent / f"{run.name}.log"
    told: list[str] = []
    for _ in range(kills + 3):
        if (run / "checkpoints" / "last.pt").is_file():
            args = ["train", "--resume", str(run)]
        else:
            args = [*argv, "--overwrite"] if run.exists() else argv
        if len(told) < kills:
            kind = rng.choice(KINDS)
            if kind == "step":  # a step this process will run: after its checkpoint
                at = rng.randint(min(_ckpt_iter(run) + 1, ITERS), ITERS)
                rc, killed = _run(_cmd(nproc, "none", 0, args), env, log, kill_after_iter=at)
            else:  # a fresh run writes 3 checkpoints and best.pt, and 6 step records and the final evaluation's
                at = rng.randint(1, {"ckpt-write": ITERS // 2 + 1, "log-write": ITERS + 1, "final-eval": 1}[kind])
                rc, killed = _run(_cmd(nproc, kind, at, args), env, log)
            if rc != 0 and not killed:
                return f"FAIL {run.name}: killed at {', '.join(told)}; then `{kind}@{at}` exited {rc} (see {log})"
            told.append(f"{kind}@{at}" + (" (ran to the end)" if rc == 0 else ""))
        else:
            rc, _ = _run(_cmd(nproc, "none", 0, args), env, log)
            if rc != 0:
                return f"FAIL {run.name}: killed at {', '.join(told)}; the next run exited {rc} (see {log})"
        if rc == 0:
            break
    else:
        return f"FAIL {run.name}: killed at {', '.join(told)}; never finished (see {log})"
    bad = _compare(ref, run)
    verdict = f"{'; '.join(bad)} (see {log})" if bad else "bit-identical"
    return f"{'FAIL' if bad else 'ok  '} {run.name}: killed at {', '.join(told) or '-'}: {verdict}"


def main(argv: list[str] | None = None) -> int:
    """Entry point; see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--kills", type=int, default=2, help="faults per trial before the clean resumes")
    p.add_argument("--seed", type=int, default=0, help="draws the kill moments")
    p.add_argument("--nproc", type=int, default=1, help="processes per training (torchrun, gloo)")
    p.add_argument("--modules", choices=("none", "all"), default="all", help="all: every module of the five methods")
    p.add_argument("--keep", help="keep the run directories here")
    args = p.parse_args(argv)
    tmp = Path(args.keep or tempfile.mkdtemp(prefix="wsss-faults-"))
    stamp, made = tmp / ".wsss-faults", json.dumps({"modules": args.modules, "nproc": args.nproc})
    if tmp.is_dir() and any(tmp.iterdir()) and not stamp.is_file():
        print(f"{tmp}: not empty and not made by this script; give an empty or new --keep folder", file=sys.stderr)
        return 2
    tmp.mkdir(parents=True, exist_ok=True)
    if not stamp.is_file() or stamp.read_text() != made:  # another module set or process count: a new reference
        shutil.rmtree(tmp / "reference", ignore_errors=True)
    stamp.write_text(made)
    env = _env(tmp)
    data = tmp / "demo"
    if not data.is_dir():
        subprocess.run([sys.executable, "-m", "wsss", "data", "demo", "--out", str(data), "--n-train", "8", "--n-val",
                        "4", "--size", "64"], cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    base = ["train", *RECIPE, "--data.root", str(data), *(STACK if args.modules == "all" else [])]
    ref = tmp / "reference"
    if not (ref / "final_eval.json").is_file():
        shutil.rmtree(ref, ignore_errors=True)
        if _run(_cmd(args.nproc, "none", 0, [*base, "--run-dir", str(ref)]), env, tmp / "reference.log")[0] != 0:
            print("FAIL reference run did not finish", file=sys.stderr)
            return 1
    rng = random.Random(args.seed)
    lines = []
    for i in range(args.trials):
        run = tmp / f"trial{i}"
        shutil.rmtree(run, ignore_errors=True)
        (tmp / f"{run.name}.log").unlink(missing_ok=True)
        lines.append(trial(ref, run, [*base, "--run-dir", str(run)], rng, args.kills, args.nproc, env))
        print(lines[-1], flush=True)
    failed = sum(ln.startswith("FAIL") for ln in lines)
    print(f"{len(lines) - failed} of {len(lines)} trials bit-identical to the uninterrupted run ({tmp})")
    if not args.keep and not failed:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.path.insert(0, str(REPO / "src"))
        sys.exit(child(sys.argv[2], int(sys.argv[3]), sys.argv[5:]))
    sys.exit(main())
