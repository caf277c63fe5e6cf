"""``wsss bench quality``: every recipe over several seeds, beside a fully supervised reference.

Each recipe (``--config``, repeatable) and the reference are trained on the same data with seeds
0..N-1 and scored on the val split (CAM at the fixed threshold plus the labelled oracle sweep,
pseudo labels, seg). The reference shares the recipes' backbone, weights, data and crop; it may
have its own schedule (``--reference CONFIG``; by default the first recipe with its method replaced
by ``fully_supervised``); overrides of ``method.*`` keys go to the recipes only. ``OUT/quality.json``
holds every per-seed result and the statistics, ``OUT/table.md`` the table (see
:mod:`wsss.bench.report`), ``OUT/quality.png`` the bar plot.

Runs live in ``OUT/runs/<row>/seed<k>``. A finished run (``final_eval.json``) whose config equals the
one asked for is read, not retrained, so a stopped benchmark continues where it stopped; one with a
checkpoint resumes from it; one that stopped before its first checkpoint is moved aside (renamed,
never deleted) and trained again. A finished run of another config is an error: nothing is reused
or overwritten silently.

Ablation mode (``--ablate``, also ``wsss bench modules``): each recipe in full and with each of its
modules switched off in turn, every row compared with its recipe's full row.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime
from pathlib import Path

from wsss.bench.report import plot, render_table, summarize
from wsss.config import (
    ConfigError,
    apply_overrides,
    drop_section,
    dump_config,
    get_dotted,
    load_config,
    read_yaml,
    resolve,
)
from wsss.data.io import DataError
from wsss.registry import DATASETS
from wsss.utils.files import atomic_write

log = logging.getLogger("wsss")
# Keys every row must share with the first recipe: otherwise the comparison is not like for like.
OUTPUTS = ("quality.json", "table.md", "quality.png")  # what a benchmark writes at the top of its --out
SHARED = ("model.backbone", "model.weights", "model.seg_hidden", "data.dataset", "data.root", "data.train_root",
          "data.val_root", "data.train_split", "data.val_split", "data.max_val_images", "data.crop_size",
          "data.options", "train.batch_size", "eval")  # fmt: skip


def variants(config: str, overrides: list[str], ablate: bool = True) -> list[tuple[str, list[str]]]:
    """[(label, extra overrides)]: the recipe itself, then (``ablate``) one row per module with that module off.

    The recipe's row is labelled with its method's name when it runs that method's own modules, else
    with the config file's stem (a stack of modules from several methods). A module another listed
    module needs (RCA's region memory) has no row of its own: switching it off switches its
    dependents off too, which the recipe's base method (all modules off) already shows.
    """
    from wsss.registry import METHODS, MODULES

    cfg = load_config(config, overrides)
    mods = list(getattr(cfg.method, "modules", ()))
    needed = {d for m in mods for d in MODULES.get(m).needs}
    own = list(getattr(METHODS.get(cfg.method_name).Config(), "modules", ()))
    name = cfg.method_name if mods == own else Path(config).stem
    rows: list[tuple[str, list[str]]] = [(name, [])]
    for m in mods if ablate else ():
        if m in needed:
            continue
        rest = ", ".join(x for x in mods if x != m)
        rows.append((f"{name} -{m}", ["--method.modules", f"[{rest}]"]))
    return rows


def data_overrides(data: str, config: str) -> list[str]:
    """Overrides that point a recipe at ``data``: a folder dataset (``tags.csv``, or ``train/`` and ``val/``
    folders that each have one), a VOC-layout root (``cls_labels.json``), or a missing or empty
    directory that the recipe's dataset writes itself into (``DatasetSpec.generate``: the demo data)."""
    root = Path(data)
    if (root / "tags.csv").is_file():
        return ["--data.dataset", "folder", "--data.root", str(root)]
    if (root / "train" / "tags.csv").is_file() and (root / "val" / "tags.csv").is_file():
        return ["--data.dataset", "folder", "--data.train_root", str(root / "train"),
                "--data.val_root", str(root / "val")]  # fmt: skip
    if (root / "cls_labels.json").is_file():
        return ["--data.root", str(root)]
    spec = DATASETS.get(load_config(config).data.dataset)
    if not (root.exists() and any(root.iterdir())) and getattr(spec, "generate", lambda r: False)(root):
        return ["--data.root", str(root)]
    raise DataError(f"{root}: not a dataset (no tags.csv, train/ and val/ folders with one, or cls_labels.json)")


def reference_config(first: str, reference: str, overrides: list[str]):
    """The reference's RunConfig: ``reference`` (a recipe path) or the first recipe as ``fully_supervised``."""
    if reference:
        return load_config(reference, overrides)
    data = read_yaml(first)
    data["method"] = {"name": "fully_supervised"}
    return resolve(apply_overrides(data, overrides))


def check_like_for_like(cfgs: dict) -> None:
    """Raise ConfigError when a row differs from the first in a key of ``SHARED``."""
    (first_label, first), *rest = cfgs.items()
    for label, cfg in rest:
        for key in SHARED:
            a, b = get_dotted(cfg, key), get_dotted(first, key)
            if a != b:
                raise ConfigError(
                    f"bench quality: '{label}' has {key} = {a!r} but '{first_label}' has {b!r}; every row must share it"
                )


def _same_config(path: Path, cfg) -> bool:
    """Whether the run config at ``path``, read by today's code (keys added since take their defaults), is ``cfg``."""
    if not path.is_file():
        return False
    try:
        return dump_config(load_config(path)) == dump_config(cfg)
    except ConfigError:  # a key since removed or renamed: not the same run
        return False


def run_seed(cfg, run_dir: Path) -> dict:
    """Train (or read, or resume) ``cfg`` in ``run_dir``; returns {metric: value, "per_class", "minutes", "commit"}
    ("minutes": wall time of the training that finished the run, the resumed part only after a resume)."""
    from wsss.engine.trainer import Trainer

    done, ckpt = run_dir / "final_eval.json", run_dir / "checkpoints" / "last.pt"
    same = _same_config(run_dir / "config.yaml", cfg)
    if done.is_file() and not same:
        raise ConfigError(f"{run_dir}: holds a finished run of another config; give another --out")
    if not done.is_file():
        t = time.time()
        if same and ckpt.is_file():
            log.info("bench quality: resuming %s", run_dir)
            Trainer(cfg, run_dir, resume=True).fit()
        else:
            if run_dir.exists():  # stopped before its first checkpoint: keep it, but out of the way
                aside = run_dir.with_name(f"{run_dir.name}.interrupted-{datetime.now():%Y%m%d-%H%M%S}")
                run_dir.rename(aside)
                log.info("bench quality: %s (unfinished, %s) moved to %s", run_dir,
                         "another config" if ckpt.is_file() else "no checkpoint", aside)  # fmt: skip
            Trainer(cfg, run_dir).fit()
        info = {"minutes": (time.time() - t) / 60}
        atomic_write(run_dir / "bench_run.json", lambda p: Path(p).write_text(json.dumps(info)))
    res = json.loads(done.read_text())
    info_path = run_dir / "bench_run.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    env = json.loads((run_dir / "env.json").read_text()) if (run_dir / "env.json").is_file() else {}
    out = {"seg": res["seg"]["miou"], "per_class": {k: v["iou"] for k, v in res.items()},
           "seg_pixel_acc": res["seg"]["pixel_acc"], "minutes": info.get("minutes", float("nan")),
           "commit": env.get("git_sha", "")[:7] + (" (uncommitted changes)" if env.get("git_dirty") else ""),
           "weights": env.get("weights_source", "")}  # fmt: skip
    if "cam" in res:
        out["cam"] = res["cam"]["miou"]
        out["cam_oracle"] = res["cam"].get("oracle_sweep", {}).get("best_miou", float("nan"))
    if "pseudo" in res:
        out["pseudo"] = res["pseudo"]["miou"]
    # Where the seg head paints beyond its labels (evaluations older than these shares have none).
    for key, src, field in (("gt_fg", "seg", "gt"), ("seg_fg", "seg", "pred"), ("pseudo_fg", "pseudo", "pred"),
                            ("pseudo_band", "pseudo", "band")):  # fmt: skip
        if field in res.get(src, {}).get("fg_share", {}):
            out[key] = res[src]["fg_share"][field]
    return out


def plan_rows(configs: list[str], overrides: list[str], ablate: bool, reference: str) -> list[dict]:
    """The rows to train, in order: {label, config, extra overrides, baseline label (None for the rows
    compared with nothing), reference flag, derived (the reference is the first recipe as fully_supervised)}."""
    rows: list[dict] = []
    first = variants(configs[0], overrides, False)[0][0]
    for config in configs:
        vs = variants(config, overrides, ablate)
        taken = {r["label"] for r in rows}
        if vs[0][0] in taken:  # a second recipe of one method (another lr, say): named by its file instead
            vs = [(Path(config).stem + label[len(vs[0][0]) :], extra) for label, extra in vs]
        for label, extra in vs:
            if label in taken:
                raise ConfigError(f"{config}: its row {label!r} is named like an earlier one; rename the file")
            base = vs[0][0] if ablate else first
            rows.append({"label": label, "config": config, "extra": extra, "reference": False,
                         "baseline": base if label != base else None})  # fmt: skip
    if reference != "none":
        label = (
            load_config(reference, drop_section(overrides, "method")).method_name if reference else "fully_supervised"
        )
        if any(r["label"] == label for r in rows):
            raise ConfigError(f"reference {reference or configs[0]}: named {label!r} like a recipe row; "
                              "give it with --reference instead of --config")  # fmt: skip
        rows.append({"label": label, "config": reference or configs[0], "extra": [], "reference": True,
                     "baseline": None, "derived": not reference})  # fmt: skip
    return rows


def row_config(row: dict, overrides: list[str], seed: int):
    """The RunConfig of ``row`` at ``seed``; ``method.*`` overrides are the recipes' and skip the reference."""
    if row["reference"]:
        over = [*drop_section(overrides, "method"), "--train.seed", str(seed)]
        return reference_config(row["config"], "" if row.get("derived") else row["config"], over)
    return load_config(row["config"], [*overrides, *row["extra"], "--train.seed", str(seed)])


def bench_quality(configs: list[str], out: str, seeds: int, data: str = "", overrides: list[str] | None = None,
                  ablate: bool = False, reference: str = "", command: str = "") -> dict:  # fmt: skip
    """Train and score every row at every seed (skipping finished runs); writes quality.json, table.md and
    quality.png under ``out`` and returns the quality dict.

    Args:
        configs: recipe paths; the first is the baseline of the paired differences (plain mode).
        out: output directory.
        seeds: number of seeds (0..seeds-1).
        data: dataset directory (see :func:`data_overrides`); empty: the recipes' own data.
        overrides: dotted overrides for every row.
        ablate: ablation mode (each module off in turn).
        reference: reference recipe path, "" (derive from the first recipe) or "none".
        command: the command line, recorded in the outputs.
    """
    if seeds < 1:
        raise ConfigError(f"bench quality: --seeds must be at least 1, got {seeds}")
    try:
        import matplotlib  # noqa: F401  (checked before hours of training, not after)
    except ImportError:
        raise ConfigError("bench quality: the bar plot needs matplotlib (pip install 'wsss[viz]')") from None
    overrides = list(overrides or [])
    if data:
        overrides = [*data_overrides(data, configs[0]), *overrides]
    rows = plan_rows(configs, overrides, ablate, reference)
    first = {r["label"]: row_config(r, overrides, 0) for r in rows}
    check_like_for_like(first)
    from wsss.build import build_dataset, build_eval_dataset

    cfg0 = next(iter(first.values()))
    if not build_eval_dataset(cfg0, cfg0.eval.split or cfg0.data.val_split).load_masks:
        raise ConfigError("bench quality: the val split has no masks; the benchmark scores mIoU against masks")
    for label, cfg in first.items():
        if cfg.train.eval_every < 0:
            raise ConfigError(f"bench quality: '{label}' has train.eval_every -1; the benchmark scores the final model")
    out_dir = Path(out)
    theirs = [n for n in OUTPUTS if (out_dir / n).exists()]
    if theirs and not (out_dir / "quality.json").is_file():  # a folder a benchmark never wrote: not ours to overwrite
        raise ConfigError(
            f"bench quality: {out_dir / theirs[0]} exists and {out_dir} holds no benchmark; give another --out"
        )
    total, k, t0 = len(rows) * seeds, 0, time.time()
    for r in rows:
        r["runs"] = {}
        for seed in range(seeds):
            k += 1
            cfg = row_config(r, overrides, seed)
            log.info("bench quality: %s seed %d (%d/%d)", r["label"], seed, k, total)
            slug = r["label"].replace(" -", "-no-").replace(" ", "_").replace("/", "_")
            r["runs"][str(seed)] = run_seed(cfg, out_dir / "runs" / slug / f"seed{seed}")
        r["method"], r["modules"] = cfg.method_name, list(getattr(cfg.method, "modules", ()))
    val = build_dataset(cfg, cfg.eval.split or cfg.data.val_split, train=False, load_masks=True)
    val_images = min(len(val), cfg.data.max_val_images or len(val))
    runs = [run for r in rows for run in r["runs"].values()]
    quality = {
        "command": command, "commits": sorted({run["commit"] for run in runs if run["commit"]}),
        "seeds": list(range(seeds)), "val_images": val_images, "classes": list(val.classes.seg_names),
        "backbone": cfg.model.backbone, "weights": "; ".join(sorted({run["weights"] for run in runs})),
        "eval": f"scales {list(cfg.eval.scales)}, flip {cfg.eval.flip}, CRF {cfg.eval.crf}",
        "minutes_total": (time.time() - t0) / 60,
        "rows": [{k2: v for k2, v in r.items() if k2 != "derived"} for r in rows],
    }  # fmt: skip
    quality["summary"] = summarize(quality["rows"])
    write_outputs(quality, out_dir)
    return quality


def write_outputs(quality: dict, out_dir: Path) -> None:
    """quality.json, table.md and quality.png (each written atomically) under ``out_dir``; prints the table."""
    table = render_table(quality)
    atomic_write(out_dir / "quality.json", lambda p: Path(p).write_text(json.dumps(quality, indent=2)))
    atomic_write(out_dir / "table.md", lambda p: Path(p).write_text(table + "\n"))
    atomic_write(out_dir / "quality.png", lambda p: plot(quality, p))
    print(table)
