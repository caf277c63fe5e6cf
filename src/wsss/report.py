"""``wsss report RUN``: one HTML page and its PNGs, to judge a run at a glance.

The page (``index.html``, no external resources) shows the run's settings and scores, and five figures
drawn with matplotlib (Agg): ``curves.png`` (every logged loss, the learning rate and the val scores over
iterations, from ``metrics.jsonl``), ``per_class.png`` (per-class IoU of CAM / pseudo label / seg, or the
tag AP of a run without masks), ``confusion.png`` (the seg confusion matrix, each ground-truth row
normalised), ``samples.png`` (image / ground truth / CAM / pseudo label / prediction for val images spread
over the split, with column titles and a colour legend). Scores come from the run's ``final_eval.json``
when it describes the loaded model and protocol (:func:`stored_results`); otherwise the split is
evaluated here.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from wsss.data.io import DataError
from wsss.utils.files import atomic_write

FIGURES = ("curves.png", "per_class.png", "confusion.png", "samples.png")
INDEX = "report.json"
NOT_LOSSES = {"iter", "lr", "sec_per_iter", "split"}


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DataError("wsss report needs matplotlib: pip install 'wsss[viz]'") from None
    return plt


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100, bbox_inches="tight"))
    _plt().close(fig)


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(training-step records, evaluation records) of a ``metrics.jsonl``; torn last lines are skipped."""
    steps: list[dict] = []
    evals: list[dict] = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        (evals if "split" in rec else steps).append(rec)
    return steps, evals


def plot_curves(steps: list[dict], evals: list[dict], path: Path) -> list[str]:
    """One panel per logged loss (NaN where a step did not log it), the lr and every val score over
    iterations; returns the panel names."""
    plt = _plt()
    keys = list(dict.fromkeys(k for r in steps for k, v in r.items() if k not in NOT_LOSSES and _num(v)))
    score_keys = list(dict.fromkeys(k for r in evals for k, v in r.items() if k not in NOT_LOSSES and _num(v)))
    panels = keys + ["lr"] * any("lr" in r for r in steps) + ["val scores"] * bool(score_keys)
    if not panels:
        raise DataError(f"{path.parent}: metrics.jsonl holds no logged step to plot")
    cols = min(3, len(panels))
    n_rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4.2 * cols, 2.8 * n_rows), squeeze=False)
    for ax, name in zip(axes.flat, panels):
        recs, names = (evals, score_keys) if name == "val scores" else (steps, [name])
        for k in names:
            its = [r["iter"] for r in recs]
            ax.plot(its, [r.get(k, float("nan")) for r in recs], marker="o" if len(its) < 10 else None, label=k)
        ax.set_title(name)
        ax.set_xlabel("iteration")
        if name == "val scores":
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    _save(fig, path)
    return panels


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def per_class_series(results: dict, classes) -> tuple[dict[str, list[float]], list[str], str]:
    """({evaluator: per-class values in %}, class names, metric name): IoU over the seg classes for the mask
    evaluators present (cam, pseudo, seg, in that order), else the tag AP over the foreground classes."""
    iou = {k: [100 * v for v in results[k]["iou"]] for k in ("cam", "pseudo", "seg") if "iou" in results.get(k, {})}
    if iou:
        return iou, list(classes.seg_names), "IoU"
    return {"tags": [100 * v for v in results["tags"]["ap"]]}, list(classes.names), "AP"


def plot_per_class(series: dict[str, list[float]], names: list[str], metric: str, path: Path) -> None:
    """Grouped bars, one group per class and one bar per evaluator."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(names) * len(series)), 3.6))
    width = 0.8 / len(series)
    for i, (k, vals) in enumerate(series.items()):
        ax.bar(np.arange(len(names)) + (i - (len(series) - 1) / 2) * width, vals, width, label=k)
    ax.set_xticks(
        np.arange(len(names)), names, rotation=45 if len(names) > 8 else 0, ha="right" if len(names) > 8 else "center"
    )
    ax.set_ylabel(f"{metric} (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def plot_confusion(conf: np.ndarray, names: list[str], path: Path) -> np.ndarray:
    """Row-normalised (K, K) confusion heat map with the shares written in; returns the normalised matrix."""
    plt = _plt()
    rows = conf.sum(1, keepdims=True)
    norm = np.divide(conf, rows, out=np.zeros_like(conf, dtype=np.float64), where=rows > 0)
    K = len(names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * K, 0.8 + 0.45 * K))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(K), names, rotation=90)
    ax.set_yticks(range(K), names)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    if K <= 25:  # beyond that the numbers do not fit their cells
        for (i, j), v in np.ndenumerate(norm):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v > 0.5 else "black")
    fig.tight_layout()
    _save(fig, path)
    return norm


@torch.no_grad()
def sample_tiles(method, dataset, device, n: int) -> tuple[list[str], list[list[np.ndarray]], list[str]]:
    """(column titles, rows of (H, W, 3) uint8 tiles, image names) for ``n`` images spread evenly over
    ``dataset``: the panels of :func:`wsss.viz.report.sample_panels` (image, ground truth with masks, CAM
    and pseudo label for methods with CAMs, prediction)."""
    from wsss.viz.report import sample_panels

    picks = np.unique(np.linspace(0, len(dataset) - 1, min(n, len(dataset))).round().astype(int))
    titles, rows, names = [], [], []
    for i in picks:
        s = dataset[int(i)]
        x, tags = s["image"][None].to(device), s["tags"][None].to(device)
        panels = sample_panels(method, x, tags, s["mask"] if dataset.load_masks else None, dataset.classes.palette)
        titles = list(panels)
        rows.append([t.permute(1, 2, 0).numpy() for t in panels.values()])
        names.append(s["name"])
    return titles, rows, names


def plot_samples(titles: list[str], rows: list[list[np.ndarray]], names: list[str], classes, path: Path) -> None:
    """The tiles as a grid with column titles, row names and a legend of the class colours."""
    plt = _plt()
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(len(rows), len(titles), figsize=(2.2 * len(titles), 2.2 * len(rows) + 0.6), squeeze=False)
    for r, (row, name) in enumerate(zip(rows, names)):
        for c, tile in enumerate(row):
            ax = axes[r, c]
            ax.imshow(tile)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
            if c == 0:
                ax.set_ylabel(name, fontsize=7)
    pal = np.asarray(classes.palette[: 3 * 256]).reshape(-1, 3) / 255
    handles = [Patch(color=pal[k], label=n) for k, n in enumerate(classes.seg_names)]
    if "pseudo label" in titles:
        handles.append(Patch(color=pal[classes.ignore_index], label=f"uncertain ({classes.ignore_index})"))
    fig.legend(handles=handles, loc="lower center", ncol=min(8, len(handles)), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    _save(fig, path)


def write_html(
    path: Path, title: str, facts: dict, headline: dict, table: tuple[list[str], dict], figures: dict
) -> None:
    """``index.html``: facts, headline scores, the per-class table and each figure with its caption."""
    e = html.escape
    names, series = table
    head = "".join(f"<th>{e(k)}</th>" for k in series)
    body = "".join(f"<tr><td>{e(n)}</td>" + "".join(f"<td>{_cell(series[k][i])}</td>" for k in series) + "</tr>"
                   for i, n in enumerate(names))  # fmt: skip
    figs = "".join(f'<figure><img src="{e(f)}" alt="{e(cap)}"><figcaption>{e(cap)}</figcaption></figure>'
                   for f, cap in figures.items())  # fmt: skip
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}td:first-child,th:first-child{{text-align:left}}
img{{max-width:100%}}figure{{margin:2em 0}}figcaption{{color:#555}}</style></head><body>
<h1>{e(title)}</h1>
<table>{"".join(f"<tr><td>{e(k)}</td><td>{e(str(v))}</td></tr>" for k, v in facts.items())}</table>
<h2>Scores</h2><table>{"".join(f"<tr><td>{e(k)}</td><td>{_cell(v)}</td></tr>" for k, v in headline.items())}</table>
<h2>Per class</h2><table><tr><th>class</th>{head}</tr>{body}</table>
{figs}
</body></html>
"""
    atomic_write(path, lambda p: Path(p).write_text(page, encoding="utf-8"))


def _cell(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def stored_results(target: Path, run_dir: Path, split: str, val_split: str, overrides) -> dict | None:
    """The run's own final evaluation when it describes what the report loaded: the run's last checkpoint
    (not best.pt or another file), its val split, the recipe's eval protocol (no ``--eval.*`` override),
    written after the checkpoint, holding the seg confusion matrix (or only the tag level); else None."""
    final, last = run_dir / "final_eval.json", run_dir / "checkpoints" / "last.pt"
    if target.resolve() not in (run_dir.resolve(), last.resolve()) or split != val_split:
        return None
    if any(str(o).startswith("--eval.") for o in overrides) or not final.is_file() or not last.is_file():
        return None
    if final.stat().st_mtime < last.stat().st_mtime:  # resumed since: the scores are of an older model
        return None
    try:
        res = json.loads(final.read_text())
    except json.JSONDecodeError:
        return None
    return res if "confusion" in res.get("seg", {}) or ("tags" in res and "seg" not in res) else None


def build_report(target: str | Path, out: str | Path | None = None, split: str = "", samples: int = 6,
                 overwrite: bool = False, overrides: Sequence[str] = (), progress=None) -> Path:  # fmt: skip
    """Write the report of a run (see the module docstring) into ``out`` (default RUN/report); returns the
    path of ``index.html``. Never replaces a file it did not write (``overwrite``: an earlier report's)."""
    from wsss.api import load_run
    from wsss.build import build_eval_dataset
    from wsss.data.loader import eval_loader
    from wsss.evaluation.evaluators import headline, run_evaluation
    from wsss.evaluation.outputs import guard_outputs, planned_records, write_index

    _plt()  # a missing matplotlib is an error before any work
    if samples < 1:
        raise DataError(f"--samples {samples}: give at least one image for the sample grid")
    cfg, method, classes, device, run_dir = load_run(target, list(overrides))
    val_split = cfg.eval.split or cfg.data.val_split
    split = split or val_split
    out = Path(out) if out else run_dir / "report"
    planned = {"report": [*FIGURES, "index.html"]}
    earlier = guard_outputs(out, planned, set(), INDEX, overwrite, "wsss report").get("images", [])
    kept = [f for r in earlier for f in r.get("outputs", []) if (out / f).exists()]  # stale ones stay ours
    steps, evals = read_metrics(run_dir / "metrics.jsonl")
    if not steps:
        raise DataError(f"{run_dir / 'metrics.jsonl'}: no logged training step to plot")
    ds = build_eval_dataset(cfg, split)
    if split == val_split and cfg.data.max_val_images:  # as the trainer scored it
        ds.items = ds.items[: cfg.data.max_val_images]
    if not len(ds):
        raise DataError(f"split {split}: no images to report on")
    out.mkdir(parents=True, exist_ok=True)
    write_index(out / INDEX, {"run": str(run_dir), "split": split}, planned_records(planned))
    results = stored_results(Path(target), run_dir, split, val_split, overrides)
    if results is not None:
        source = "final_eval.json"
    else:
        which = ("seg", "cam", "pseudo") if ds.load_masks else ("tags",)
        loader = eval_loader(ds, cfg.eval.batch_size, 0, 1, cfg.data.num_workers)
        results = run_evaluation(method, loader, classes, cfg.eval, device, which, progress)
        source = f"evaluated by wsss report ({len(ds)} images)"
    figures = {"curves.png": "Training curves: " + ", ".join(plot_curves(steps, evals, out / "curves.png"))}
    series, names, metric = per_class_series(results, classes)
    plot_per_class(series, names, metric, out / "per_class.png")
    figures["per_class.png"] = f"Per-class {metric} on {split}: " + ", ".join(series)
    if "confusion" in results.get("seg", {}):
        plot_confusion(np.asarray(results["seg"]["confusion"], dtype=np.int64), list(classes.seg_names),
                       out / "confusion.png")  # fmt: skip
        figures["confusion.png"] = f"Seg confusion matrix on {split}, each ground-truth row normalised"
    titles, rows, picked = sample_tiles(method, ds, device, samples)
    plot_samples(titles, rows, picked, classes, out / "samples.png")
    figures["samples.png"] = f"{len(rows)} {split} images spread over the split: " + " | ".join(titles)
    env = json.loads((run_dir / "env.json").read_text()) if (run_dir / "env.json").is_file() else {}
    facts = {"run": run_dir, "method": cfg.method_name + "".join(f" + {m}" for m in getattr(cfg.method, "modules", ())),
             "backbone": cfg.model.backbone, "weights": env.get("weights_source", "?"),
             "iterations": f"{steps[-1]['iter']} of {cfg.train.max_iters}", "commit": env.get("git_sha", "?"),
             "split": f"{split} ({len(ds)} images)", "scores from": source}  # fmt: skip
    scores = {k: 100 * v for k, v in headline(results).items()}
    write_html(out / "index.html", f"wsss report: {run_dir.name}", facts, scores, (names, series), figures)
    write_index(out / INDEX, {"run": str(run_dir), "split": split, "scores_from": source},
                [{"name": "report", "outputs": list(dict.fromkeys([*figures, "index.html", *kept]))}])  # fmt: skip
    return out / "index.html"
