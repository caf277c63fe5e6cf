"""The files of a run directory, and the rules that keep an earlier run's files safe.

A new run never writes into a directory that holds another run's files: it needs ``--resume`` (continue
it) or ``--overwrite`` (replace it; only the trainer's own files are removed). A resumed run starts by
removing the temporary files a kill during an atomic write left behind, and by cutting
``metrics.jsonl`` back to the checkpoint it resumes from, so every iteration is logged once. While a
trainer writes into a directory it holds ``.wsss.lock``: a second process (a resume, an ``--overwrite``)
is refused instead of writing into the same files.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from wsss.utils.files import atomic_write

log = logging.getLogger("wsss")

# What the trainer writes into a run directory (``tb/``: TensorBoard, when on).
RUN_FILES = ("config.yaml", "env.json", "metrics.jsonl", "final_eval.json")
RUN_DIRS = ("checkpoints", "tb")
LOCK_FILE = ".wsss.lock"


class RunDirError(ValueError):
    """A run directory that cannot be used as asked (it holds an earlier run, or no run to resume)."""


def earlier_run(run_dir: Path) -> list[str]:
    """Names of the trainer's files and folders present in ``run_dir`` (empty: a fresh directory)."""
    return [n for n in (*RUN_FILES, *RUN_DIRS) if (run_dir / n).exists() or (run_dir / n).is_symlink()]


def prepare_new_run(run_dir: Path, overwrite: bool, remove: bool = True) -> None:
    """Before a new run writes anything: refuse a directory holding an earlier run's files, or, with
    ``overwrite`` (and ``remove``; False: only the check, made before the run's other checks), remove the
    trainer's files (and only those: a user's other files stay, inside ``checkpoints/`` and ``tb/`` too).

    Raises:
        RunDirError: ``run_dir`` holds a run and ``overwrite`` is off, or it is not a directory.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: exists and is not a directory; give another --run-dir")
    found = earlier_run(run_dir)
    if not found:
        return
    if not overwrite:
        raise RunDirError(f"{run_dir}: holds an earlier run ({', '.join(found)}); continue it with --resume "
                          f"{run_dir}, replace it with --overwrite, or give another --run-dir")  # fmt: skip
    if not remove:
        return
    for name in found:
        p = run_dir / name
        if p.is_dir() and not p.is_symlink():
            for f in p.iterdir():
                if _ours(name, f.name):
                    f.unlink()
            if not any(p.iterdir()):
                p.rmdir()
        else:
            p.unlink()
    for p in sorted(run_dir.glob("eval_*.json")):  # `wsss evaluate` scores of the model being replaced
        p.unlink()
    if left := sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_FILE):
        log.warning("%s: --overwrite removed the earlier run's %s; left in place: %s", run_dir, ", ".join(found),
                    ", ".join(left))  # fmt: skip


def _ours(folder: str, name: str) -> bool:
    """Whether ``folder/name`` is a file the trainer writes (checkpoints, their temporaries, TensorBoard events)."""
    if folder == "tb":
        return name.startswith("events.out.tfevents.")
    plain = name[1:] if name.startswith(".") and name.endswith(".tmp") else name
    return bool(re.fullmatch(r"(last|best|iter_\d+)\.pt(\..+\.tmp)?", plain))


def remove_temporaries(run_dir: Path) -> list[Path]:
    """Delete the temporary files of interrupted atomic writes (``.NAME.*.tmp`` of the trainer's files and
    checkpoints) in ``run_dir`` and ``run_dir/checkpoints``; returns what was removed."""
    gone = []
    for folder in (run_dir, run_dir / "checkpoints"):
        if not folder.is_dir():
            continue
        for p in folder.glob(".*.tmp"):
            name = p.name[1:]
            if any(name.startswith(f"{n}.") for n in (*RUN_FILES, "last.pt", "best.pt")) or name.startswith("iter_"):
                p.unlink(missing_ok=True)
                gone.append(p)
    if gone:
        log.info("removed %d temporary file(s) of an interrupted write: %s", len(gone), ", ".join(p.name for p in gone))
    return gone


def _records(path: Path) -> Iterator[tuple[str, int | None, dict]]:
    """(line, its iteration, record) of each line of ``metrics.jsonl``; a torn or foreign line has None."""
    if not path.is_file():
        return
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
            yield line, int(rec["iter"]), rec
        except (ValueError, KeyError, TypeError):
            yield line, None, {}


def trim_metrics(path: Path, start_iter: int, redo_eval: bool) -> int:
    """Cut ``metrics.jsonl`` back to what a run resumed at ``start_iter`` has done: records of later
    iterations (they will be logged again) and torn lines go; with ``redo_eval`` the evaluation records
    of ``start_iter`` too (the final evaluation runs again). Returns the number of records dropped."""
    kept, dropped = [], 0
    for line, it, rec in _records(path):
        if it is None or it > start_iter or (redo_eval and it == start_iter and "split" in rec):
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        atomic_write(path, lambda p: Path(p).write_text("".join(f"{k}\n" for k in kept)))
        log.info("metrics.jsonl: %d record(s) after iteration %d dropped (they are logged again)", dropped,
                 start_iter)  # fmt: skip
    return dropped


def evaluated_at(path: Path, it: int) -> bool:
    """Whether ``metrics.jsonl`` holds an evaluation record of iteration ``it``."""
    return any(i == it and "split" in rec for _line, i, rec in _records(path))


class RunLock:
    """An exclusive POSIX lock on ``run_dir/.wsss.lock`` (the file holds the owner's pid), held while a trainer
    writes into ``run_dir``; released (and the file removed) by :meth:`release`, or by the system when the
    process ends, also when it is killed. A POSIX lock (``lockf``) rather than ``flock``: forked data-loader
    workers do not inherit it, so a killed run's lingering workers never block its resume. It guards
    against other processes only. Without ``fcntl`` (Windows) runs are not guarded."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.file: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock (a no-op when held).

        Raises:
            RunDirError: another process holds it (the message names its pid).
        """
        try:
            import fcntl
        except ImportError:  # pragma: no cover - no flock on this platform
            return
        while self.file is None:
            f = open(self.path, "a+")
            try:
                fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.seek(0)
                holder = f.read().strip() or "unknown"
                f.close()
                raise RunDirError(f"{self.path.parent}: another wsss process (pid {holder}) is writing this run; "
                                  "wait for it to end or stop it, then run again") from None  # fmt: skip
            try:  # the holder before us may have removed the file after we opened it: lock the one on disk
                same = os.stat(self.path).st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                f.close()
                continue
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
            self.file = f

    def release(self) -> None:
        """Remove the lock file and drop the lock (a no-op when not held)."""
        if self.file is None:
            return
        self.path.unlink(missing_ok=True)  # before the unlock: a waiting process then locks a new file
        self.file.close()
        self.file = None
