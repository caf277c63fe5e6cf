"""``make demo`` / ``python -m wsss.demo``: the main job on the built-in demo data.

Generates the demo data (once), trains the ``toco`` bench recipe (the packaged ``demo/toco``, which is
``configs/bench/toco.yaml``) and the ``fully_supervised`` upper bound with the same backbone, crop
and, to stay within 10 minutes on a 2-core CPU, the same 350-iteration schedule (the benchmark's
reference trains longer, to convergence: docs/benchmarks.md), evaluates both on the val split and
prints CAM, pseudo-label and seg mIoU with the ratio to the fully supervised seg mIoU, next to the
trivial all-background score. Everything lands in ``runs/demo/`` (summary.json included).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path

import torch

from wsss.config import drop_section, load_config
from wsss.data.io import read_mask
from wsss.engine.trainer import Trainer
from wsss.recipes import recipe_dir
from wsss.utils.files import atomic_write

log = logging.getLogger("wsss")


def all_background_miou(ds) -> float:
    """mIoU of predicting background everywhere on dataset ``ds`` (masks read directly)."""
    from wsss.evaluation.confusion import ConfusionMatrix

    cm = ConfusionMatrix(ds.classes.K, ds.classes.ignore_index)
    for it in ds.items:
        m = torch.from_numpy(read_mask(it.mask).astype("int64"))
        cm.update(torch.zeros_like(m), m)
    return cm.compute()["miou"]


def train_row(cfg, run_dir: Path) -> tuple[dict, Trainer]:
    """Train ``cfg`` into a fresh ``run_dir`` and score it; ({cam, pseudo, seg mIoU, minutes}, trainer)."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    t = time.time()
    trainer = Trainer(cfg, run_dir)
    res = trainer.fit()
    if res is None:  # the demo recipes evaluate at the end; a recipe that does not cannot be tabled
        raise RuntimeError(f"{run_dir}: the run made no final evaluation (train.eval_every -1?)")
    return {k: v["miou"] for k, v in res.items()} | {"minutes": (time.time() - t) / 60}, trainer


def fmt_miou(v) -> str:
    """mIoU in % with two decimals, ``-`` when missing."""
    return "   -" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:6.2f}"


def ensure_demo_data(data: Path) -> None:
    """Generate the demo data into ``data`` unless it is already there (a warning when it was generated with
    other knobs than today's defaults, which the recipes and every quoted figure assume)."""
    from dataclasses import asdict

    from wsss.data.synthetic import DemoConfig
    from wsss.registry import DATASETS

    if not (data / "cls_labels.json").is_file():
        DATASETS.get("demo").generate(data)
        return
    knobs = data / "demo_config.json"
    old = json.loads(knobs.read_text()) if knobs.is_file() else {}
    diff = {k: (old.get(k), v) for k, v in asdict(DemoConfig()).items() if old.get(k) != v}
    if diff:
        log.warning("%s was generated with %s; the recipes are set for the defaults (remove it to regenerate)", data,
                    ", ".join(f"{k} {a} (default {b})" for k, (a, b) in diff.items()))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns a process exit code."""
    p = argparse.ArgumentParser(prog="python -m wsss.demo", description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/demo")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--configs", default=str(recipe_dir() / "demo"), help="folder of toco.yaml, fully_supervised.yaml")
    args, overrides = p.parse_known_args(argv)  # the rest: dotted overrides for both runs
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    data = Path(args.data)
    ensure_demo_data(data)
    rows = {}
    t0 = time.time()
    iters: list[str] = []  # the reference follows the weak recipe's schedule and takes no method.* overrides
    for name in ("toco", "fully_supervised"):
        cfg = load_config(Path(args.configs) / f"{name}.yaml", ["--data.root", str(data), *iters, *overrides])
        iters = ["--train.max_iters", str(cfg.train.max_iters)]
        overrides = drop_section(overrides, "method")
        rows[name], trainer = train_row(cfg, Path(args.out) / name)
        bg = all_background_miou(trainer.val_ds)
        weights = trainer.method.backbone.weights_source
    fs = rows["fully_supervised"]["seg"]
    n_val = len(trainer.val_ds) if trainer.val_ds is not None else 0
    lines = [
        f"demo val ({n_val} images), backbone {cfg.model.backbone}, weights {weights}",
        f"{'method':<18}{'CAM':>8}{'pseudo':>8}{'seg':>8}{'seg/FS':>8}{'min':>6}",
    ]
    for name, r in rows.items():
        lines.append(f"{name:<18}{fmt_miou(r.get('cam')):>8}{fmt_miou(r.get('pseudo')):>8}{fmt_miou(r['seg']):>8}"
                     f"{r['seg'] / fs:>8.2f}{r['minutes']:>6.1f}")  # fmt: skip
    lines.append(f"{'all background':<18}{'':>8}{'':>8}{fmt_miou(bg):>8}{bg / fs:>8.2f}")
    lines.append(
        f"total {(time.time() - t0) / 60:.1f} min; mIoU in %, single scale, no CRF; both {cfg.train.max_iters} "
        "iterations (the converged reference and 3-seed figures: docs/benchmarks.md)"
    )
    print("\n".join(lines))
    summary = {"rows": rows, "all_background_miou": bg, "weights": weights, "backbone": cfg.model.backbone}
    atomic_write(Path(args.out) / "summary.json", lambda p: Path(p).write_text(json.dumps(summary, indent=2)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
