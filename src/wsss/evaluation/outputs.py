"""Output folders of the commands that write a set of files per image (``wsss predict``, ``wsss pseudo-labels``).

Two rules: a command never replaces a file it did not write (an input image, a user's file, a dangling
link), and the folder's index JSON lists every file the command may have written, including after a
crash: the index is written before the first image (with the planned files) and again at the end.
With ``overwrite`` a command may replace the files an earlier run of it listed in the same index; the
earlier index's entries for other images are kept.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from wsss.data.io import DataError
from wsss.utils.files import atomic_write


def guard_outputs(out_dir: Path, planned: dict[str, list[str]], inputs: set[Path], index_name: str,
                  overwrite: bool, command: str) -> dict:  # fmt: skip
    """Raise DataError, before any work, when a planned file would replace an input, a file that exists
    and is not ours, or a file planned for another image.

    Args:
        out_dir: the output folder.
        planned: image name -> the file names (inside ``out_dir``) written for it.
        inputs: resolved paths of the input images.
        index_name: the folder's index file (e.g. ``predictions.json``).
        overwrite: files listed in an earlier index of ``command`` in ``out_dir`` may be replaced.
        command: the command's name, for the messages.
    Returns:
        The earlier index (its settings and ``images`` records; empty without ``overwrite`` or an index).
    """
    index = out_dir / index_name
    earlier: dict = {}
    ours: set[str] = set()
    if overwrite and index.is_file():
        try:
            earlier = json.loads(index.read_text())
            ours = {f for im in earlier["images"] for f in im["outputs"]} | {index_name}
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{index}: not an index written by {command}; give another --out") from None
    owner: dict[str, str] = {}
    for name, files in planned.items():
        for f in files:
            if owner.setdefault(f, name) != name:  # e.g. images `a` and `a_overlay` with --overlay
                raise DataError(f"{out_dir / f}: written for both {owner[f]} and {name}; run them apart")
            p = out_dir / f
            if p.resolve() in inputs:
                raise DataError(f"{p}: is an input image; give another --out")
            if (p.exists() or p.is_symlink()) and f not in ours:  # a dangling link is the user's too
                hint = f"it is not in this folder's {index_name}" if overwrite else "give --overwrite"
                raise DataError(f"{p}: exists and would be replaced ({hint} or another --out)")
    if (index.exists() or index.is_symlink()) and index_name not in ours:
        raise DataError(f"{index}: exists (give --overwrite to replace an earlier {command}, or another --out)")
    return earlier


def write_index(path: Path, meta: dict, records: list[dict], earlier: Sequence[dict] = ()) -> None:
    """Write the index JSON ``{**meta, "images": [...]}`` atomically: ``earlier``'s records of images that
    ``records`` does not name, then ``records`` (each a dict with at least ``name`` and ``outputs``)."""
    names = {r["name"] for r in records}
    images = [r for r in earlier if r.get("name") not in names] + list(records)
    atomic_write(path, lambda p: Path(p).write_text(json.dumps({**meta, "images": images}, indent=2)))


def planned_records(planned: dict[str, list[str]]) -> list[dict]:
    """Index records for files not written yet (``done`` False): what the index holds while a command runs."""
    return [{"name": n, "outputs": list(fs), "done": False} for n, fs in planned.items()]
