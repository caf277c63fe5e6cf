"""The recipes shipped inside the package (``wsss/configs``), found by name: ``--config bench/toco``.

A wheel carries them as package data, so a ``pip install`` user has the same recipes as a clone (where
``configs/`` at the repository root points at this folder). A name is a recipe's path under the folder
without ``.yaml``; a file that exists always wins over a name, so a user's own ``bench/toco.yaml`` in the
working directory wins over the packaged ``bench/toco``.
"""

from __future__ import annotations

import difflib
from pathlib import Path


def recipe_dir() -> Path:
    """The folder of the packaged recipes."""
    return Path(__file__).parent / "configs"


def recipe_names() -> list[str]:
    """Every packaged recipe's name (``bench/toco``), sorted."""
    root = recipe_dir()
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def describe(name: str) -> str:
    """The first comment line of a packaged recipe (its summary), without the ``#``."""
    for line in (recipe_dir() / f"{name}.yaml").read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


def find_recipe(path_or_name: str | Path) -> Path | None:
    """The file ``path_or_name`` names (``.yaml`` optional), looked up in the working directory first, then
    among the packaged recipes (a leading ``configs/`` dropped); None when neither has it."""
    path = Path(path_or_name)
    local = (path, path.with_name(path.name + ".yaml"))
    if path.is_absolute() or ".." in path.parts:
        return next((c for c in local if c.is_file()), None)
    # a clone's `configs/bench/toco.yaml` names the packaged bench/toco too, for a pip install's users
    name = Path(*path.parts[1:]) if path.parts[0] == "configs" and len(path.parts) > 1 else path
    packaged = (recipe_dir() / name, recipe_dir() / name.with_name(name.name + ".yaml"))
    return next((c for c in local + packaged if c.is_file()), None)


def close_names(path_or_name: str | Path, n: int = 3) -> list[str]:
    """Packaged recipe names closest to what was asked for (to suggest in an error)."""
    want = Path(path_or_name).as_posix().removesuffix(".yaml").removeprefix("configs/")
    return difflib.get_close_matches(want, recipe_names(), n=n, cutoff=0.5)
