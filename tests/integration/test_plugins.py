"""Out-of-tree code registers a method and a dataset through the ``wsss.plugins`` entry point: the example in
examples/plugin, installed as pip would (a dist-info with entry_points.txt on the path), used by the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import TINY

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "plugin"


def install(site: Path, name: str, module_file: Path | None = None, source: str | None = None) -> None:
    """What `pip install` leaves for an entry point: the module and a dist-info naming it in wsss.plugins."""
    module = name.replace("-", "_")
    site.mkdir(parents=True, exist_ok=True)
    if module_file is not None:
        shutil.copy(module_file, site / f"{module}.py")
    else:
        (site / f"{module}.py").write_text(source)
    info = site / f"{module}-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[wsss.plugins]\n{name} = {module}\n")


def wsss(site: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m wsss ARGS`` with ``site`` on the path, from the repository root."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "wsss", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def manifest_from_demo(demo_root: Path, out: Path) -> Path:
    """The tiny demo data rewritten as a manifest dataset: images and masks under other folder names."""
    (out / "pics").mkdir(parents=True)
    (out / "labels").mkdir()
    tags = json.loads((demo_root / "cls_labels.json").read_text())
    rows = []
    for split in ("train", "val"):
        for name in (demo_root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split():
            shutil.copy(demo_root / "JPEGImages" / f"{name}.jpg", out / "pics" / f"{name}.jpg")
            shutil.copy(demo_root / "SegmentationClass" / f"{name}.png", out / "labels" / f"{name}.png")
            rows.append({"image": f"pics/{name}.jpg", "tags": tags[name], "split": split, "mask": f"labels/{name}.png"})
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copy(demo_root / "classes.txt", out / "classes.txt")
    return out


def test_a_plugin_is_listed_and_a_broken_one_is_named(tmp_path):
    site = tmp_path / "site"
    install(site, "wsss-example", EXAMPLE / "wsss_example_plugin.py")
    r = wsss(site, "list", "methods")
    assert r.returncode == 0, r.stderr
    assert "gap_cam" in r.stdout.split() and "toco" in r.stdout.split()
    # this process has no plugin on its path: the name above came from the entry point
    from wsss.registry import METHODS

    assert "gap_cam" not in METHODS.names()

    install(site, "broken", source="1 / 0\n")
    r = wsss(site, "list", "methods")
    assert r.returncode != 0
    assert "wsss plugin 'broken' (broken) failed to load: ZeroDivisionError: division by zero" in r.stderr


def test_data_check_finds_the_plugins_dataset_by_its_files(tmp_path, demo_root):
    site = tmp_path / "site"
    install(site, "wsss-example", EXAMPLE / "wsss_example_plugin.py")
    data = manifest_from_demo(demo_root, tmp_path / "manifest")
    # wsss's own checks run on the plugin's rows: a mask of the wrong size is the one problem named
    Image.new("L", (5, 5)).save(data / "labels" / "val_00001.png")
    r = wsss(site, "data", "check", str(data))
    assert r.returncode == 1, r.stderr
    errors = [ln for ln in r.stdout.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "labels/val_00001.png" in errors[0], r.stdout
    assert r.stdout.splitlines()[-1] == "1 errors, 0 warnings"


@pytest.mark.slow
def test_the_example_plugin_trains_and_evaluates_on_its_own_dataset(tmp_path, demo_root):
    site = tmp_path / "site"
    install(site, "wsss-example", EXAMPLE / "wsss_example_plugin.py")
    data = manifest_from_demo(demo_root, tmp_path / "manifest")
    run = tmp_path / "run"
    r = wsss(site, "train", "--config", str(EXAMPLE / "gap_cam.yaml"), "--data.root", str(data), "--run-dir",
             str(run), *TINY, "--train.max_iters", "3")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    final = json.loads((run / "final_eval.json").read_text())
    # every labelled pixel of the manifest's val masks (and none of train's), read through the plugin's dataset
    rows = [json.loads(line) for line in (data / "manifest.jsonl").read_text().splitlines()]
    labelled = sum(int((np.array(Image.open(data / r["mask"])) != 255).sum()) for r in rows if r["split"] == "val")
    assert sum(map(sum, final["seg"]["confusion"])) == labelled
    assert {"seg", "cam", "pseudo"} <= set(final)  # the method's CAMs and pseudo labels were scored too
    r = wsss(site, "evaluate", str(run))
    assert r.returncode == 0, r.stderr[-2000:]
