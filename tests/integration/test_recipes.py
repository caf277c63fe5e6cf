"""Recipes ship inside the package and are found by name (`--config demo/toco`), from any directory."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from wsss.cli import main
from wsss.config import ConfigError, dump_config, load_config
from wsss.recipes import find_recipe, recipe_dir, recipe_names

REPO = Path(__file__).resolve().parents[2]


def test_names_resolve_to_the_packaged_files_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert find_recipe("demo/toco") == recipe_dir() / "demo" / "toco.yaml"
    assert find_recipe("bench/toco.yaml") == recipe_dir() / "bench" / "toco.yaml"
    assert find_recipe("/nowhere/bench/toco") is None and find_recipe("../bench/toco") is None
    # the demo name is the bench recipe, key for key, and the repository's configs/ link holds the same files
    assert dump_config(load_config("demo/toco")) == dump_config(load_config(REPO / "configs" / "bench" / "toco.yaml"))
    assert {"demo/toco", "demo/fully_supervised", "bench/toco", "toco/voc_vit-b"} <= set(recipe_names())
    # a user's own file of the same name wins over the packaged recipe
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "toco.yaml").write_text("method:\n  name: toco\n  w_ctc: 0.25\n")
    assert find_recipe("bench/toco") == Path("bench/toco.yaml")
    assert load_config("bench/toco").method.w_ctc == 0.25
    # a clone's path names the packaged recipe where there is no clone
    assert find_recipe("configs/bench/rca.yaml") == recipe_dir() / "bench" / "rca.yaml"
    # _base_ is the file's own neighbour, however the file was named: never the packaged one
    (tmp_path / "bench" / "mine.yaml").write_text("_base_: other.yaml\n")
    for ref in ("bench/mine.yaml", str(tmp_path / "bench" / "mine.yaml")):
        with pytest.raises(ConfigError, match="other.yaml: config file not found"):
            load_config(ref)
    (tmp_path / "bench" / "mine.yaml").write_text("_base_: toco.yaml\n")
    assert (
        load_config("bench/mine.yaml").method.w_ctc
        == load_config(tmp_path / "bench" / "mine.yaml").method.w_ctc
        == 0.25
    )


def test_unknown_name_is_one_line_with_close_names(tmp_path, capsys):
    assert main(["train", "--config", "bench/tocco", "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bench/tocco: config file not found" in err[0] and "bench/toco" in err[0]
    assert not (tmp_path / "r").exists()


def test_list_recipes_names_every_file(capsys):
    assert main(["list", "recipes"]) == 0
    out = capsys.readouterr().out
    files = sorted(recipe_dir().rglob("*.yaml"))
    assert len(files) > 20 and all(p.relative_to(recipe_dir()).with_suffix("").as_posix() in out for p in files)
    assert "demo/toco  " in out and "The demo recipe" in out


def test_wheel_carries_every_recipe_and_finds_them_installed(tmp_path):
    """A wheel built from the repository holds every recipe; installed from it (unpacked, outside the
    repository), `demo/toco` loads with its _base_ chain."""
    try:
        import setuptools  # noqa: F401
    except ImportError:
        pytest.skip("setuptools is not installed, so no wheel can be built without the network")
    src = tmp_path / "repo"  # a copy: setuptools leaves build/ and egg-info beside the sources it builds
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / f, src / f)
    whl_dir = tmp_path / "whl"
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src), "-w"]
    subprocess.run([*cmd, str(whl_dir)], check=True, capture_output=True, cwd=tmp_path)
    (whl,) = whl_dir.glob("wsss-*.whl")
    with zipfile.ZipFile(whl) as z:
        z.extractall(tmp_path / "site")
        shipped = {n for n in z.namelist() if n.endswith(".yaml")}
    want = {f"wsss/configs/{p.relative_to(recipe_dir()).as_posix()}" for p in recipe_dir().rglob("*.yaml")}
    assert shipped == want
    code = ("import wsss, wsss.config as c; print(wsss.__file__); "
            "print(c.load_config('demo/toco').model.backbone, c.load_config('bench/fsr').method_name)")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path,
                         env=env)  # fmt: skip
    where, loaded = out.stdout.strip().splitlines()
    assert where.startswith(str(tmp_path / "site")) and loaded == "vit_small_patch14_dinov2 fsr"


def _leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_our_recipes_set_only_what_their_base_does_not():
    """A bench, demo or second-stage recipe (ours) holds only its differences from its _base_: a repeated value
    would silently stop following the base. The paper recipes (<method>/<dataset>_<backbone>.yaml) are exempt:
    they transcribe a paper's whole setting, so a value equal to ToCo's is still the paper's."""
    import yaml

    from wsss.config import read_yaml

    checked, repeats = 0, []
    for f in sorted(recipe_dir().rglob("*.yaml")):
        if f.parent.name not in ("bench", "demo", "second_stage"):
            continue
        raw = yaml.safe_load(f.read_text()) or {}
        if not raw.get("_base_"):
            continue
        base = _leaves(read_yaml((f.parent / raw.pop("_base_")).resolve()))
        repeats += [f"{f.parent.name}/{f.name}: {k}" for k, v in _leaves(raw).items() if k in base and base[k] == v]
        checked += 1
    assert checked >= 10 and repeats == []
