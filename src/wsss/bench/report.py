"""Statistics, tables and the bar plot of ``wsss bench quality``, computed from ``quality.json`` alone.

Pure functions of the per-seed results, so a table can be rebuilt (and checked by hand) without
training anything. Conventions, written into every table:

- mean and *sample* standard deviation (n - 1) over seeds; one seed has no spread ("-");
- the ratio to the reference is taken seed by seed (recipe seed k / reference seed k), then averaged;
- a difference to a baseline row is paired by seed (row seed k - baseline seed k); when the seeds
  disagree in sign it is labelled noise, when there is a single pair it is labelled "1 seed".
"""

from __future__ import annotations

import math
import statistics

METRICS = ("cam", "cam_oracle", "pseudo", "seg")
LABELS = {"cam": "CAM", "cam_oracle": "CAM oracle", "pseudo": "pseudo", "seg": "seg"}
# Shares of the val pixels: ground-truth foreground, the pseudo labels' foreground and ignore band, seg's foreground.
SHARES = ("gt_fg", "pseudo_fg", "pseudo_band", "seg_fg")


def mean_std(values: list[float]) -> dict:
    """{"mean", "std", "n"} of finite ``values``; std is the sample standard deviation (NaN for n < 2)."""
    v = [x for x in values if x is not None and not math.isnan(x)]
    if not v:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else float("nan"), "n": len(v)}


def paired_diff(runs: dict, base_runs: dict, metric: str) -> dict:
    """Per-seed differences ``runs[s][metric] - base_runs[s][metric]`` over the seeds both have.

    Returns {"per_seed": {seed: d}, "mean", "std", "n", "verdict"}: verdict is "noise" when the
    seeds disagree in sign (a zero counts as its own sign), "1 seed" with one pair, "" otherwise.
    """
    per = {}
    for s in sorted(set(runs) & set(base_runs), key=int):
        a, b = runs[s].get(metric), base_runs[s].get(metric)
        if a is not None and b is not None and not (math.isnan(a) or math.isnan(b)):
            per[s] = a - b
    out = mean_std(list(per.values())) | {"per_seed": per}
    signs = {0.0 if d == 0 else math.copysign(1, d) for d in per.values()}  # a tie on one seed is no consistent effect
    out["verdict"] = "1 seed" if len(per) == 1 else ("noise" if len(signs) > 1 else "")
    return out


def summarize(rows: list[dict]) -> dict:
    """{label: {metric: mean_std, "ratio": mean_std, "diff": {metric: paired_diff}, "per_class": ...}}.

    Args:
        rows: quality.json rows: ``label``, ``baseline`` (label of the row it is compared with, or
            None), ``reference`` (bool) and ``runs`` {seed: {metric: value, "per_class": {key: [iou]}}}.
    """
    by_label = {r["label"]: r for r in rows}
    ref = next((r for r in rows if r.get("reference")), None)
    out = {}
    for r in rows:
        runs = r["runs"]
        s = {m: mean_std([run.get(m, float("nan")) for run in runs.values()]) for m in METRICS}
        s["minutes"] = mean_std([run.get("minutes", float("nan")) for run in runs.values()])
        s["shares"] = {k: mean_std([run.get(k, float("nan")) for run in runs.values()]) for k in SHARES}
        if ref is not None:
            ratios = [runs[k]["seg"] / ref["runs"][k]["seg"] if ref["runs"][k]["seg"] else float("nan")
                      for k in runs if k in ref["runs"]]  # fmt: skip
            s["ratio"] = mean_std(ratios)
        base = by_label.get(r.get("baseline") or "")
        if base is not None and base is not r:
            s["diff"] = {m: paired_diff(runs, base["runs"], m) for m in METRICS}
        s["per_class"] = {
            key: [mean_std(list(col))["mean"] for col in zip(*(run["per_class"][key] for run in runs.values()))]
            for key in ("cam", "pseudo", "seg")
            if runs and all(key in run.get("per_class", {}) for run in runs.values())
        }
        out[r["label"]] = s
    return out


def _pm(ms: dict, scale: float = 100.0, digits: int = 2) -> str:
    if ms["n"] == 0:
        return "-"
    m = f"{scale * ms['mean']:.{digits}f}"
    return m if math.isnan(ms["std"]) else f"{m} ± {scale * ms['std']:.{digits}f}"


def _diff_cell(d: dict) -> str:
    if d["n"] == 0:
        return "-"
    cell = f"{100 * d['mean']:+.2f}" + ("" if math.isnan(d["std"]) else f" ± {100 * d['std']:.2f}")
    return cell + (f" ({d['verdict']})" if d["verdict"] else "")


def render_table(quality: dict) -> str:
    """Markdown: the header (command, commit, protocol), one line per row, then the per-class chain."""
    rows, summ = quality["rows"], quality["summary"]
    seeds = ", ".join(str(s) for s in quality["seeds"])
    head = [
        "# Quality benchmark",
        "",
        f"Command: `{quality['command']}`  ",
        f"Commit: {', '.join(quality['commits']) or 'unknown'}; seeds {seeds}; "
        f"val split {quality['val_images']} images; backbone {quality['backbone']} "
        f"(weights: {quality['weights']}); eval {quality['eval']}.  ",
        "mIoU in %: mean ± sample standard deviation over seeds. seg / ref: the seg mIoU divided by the reference's "
        "of the same seed. Δ: paired per-seed difference of seg mIoU to the row named; 'noise' where the seeds "
        "disagree in sign. CAM oracle: background threshold chosen with the ground truth (an upper bound, not a "
        "result).",
        "",
        "| run | seeds | CAM | CAM oracle | pseudo | seg | seg / ref | Δ seg | vs | min / run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines = []
    for r in rows:
        s = summ[r["label"]]
        label = r["label"] + (" (reference)" if r.get("reference") else "")
        ratio = _pm(s["ratio"], 1.0) if "ratio" in s and not r.get("reference") else "-"
        diff = s.get("diff", {}).get("seg")
        cells = [label, str(s["seg"]["n"]), *(_pm(s[m]) for m in METRICS), ratio,
                 _diff_cell(diff) if diff else "-", r.get("baseline") if diff else "-",
                 _pm(s["minutes"], 1.0, 1)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(head + lines + ["", *share_table(quality), *per_class_tables(quality)])


def share_table(quality: dict) -> list[str]:
    """Foreground shares of the val pixels per row (mean ± std over seeds, in %): the ground truth's, the
    pseudo labels' (labelled foreground, and the ignore band the seg loss never sees) and the seg head's.
    A seg share above pseudo fg + band is foreground painted where no label asked for it."""
    rows = [r for r in quality["rows"] if quality["summary"][r["label"]].get("shares", {}).get("seg_fg", {}).get("n")]
    if not rows:
        return []
    out = ["## Foreground share of the val pixels (%)", "",
           "| run | ground truth | pseudo fg | pseudo band | seg fg |", "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        sh = quality["summary"][r["label"]]["shares"]
        out.append(f"| {r['label']} | " + " | ".join(_pm(sh[k], 100.0, 1) for k in SHARES) + " |")
    return out + [""]


def per_class_tables(quality: dict) -> list[str]:
    """Per-class IoU (mean over seeds) of each weak row: CAM -> pseudo -> seg, beside the reference's seg."""
    summ, names = quality["summary"], quality["classes"]
    ref = next((r for r in quality["rows"] if r.get("reference")), None)
    ref_seg = summ[ref["label"]]["per_class"].get("seg") if ref else None
    out = []
    for r in quality["rows"]:
        pc = summ[r["label"]]["per_class"]
        if r.get("reference") or not pc:
            continue
        out += [f"## Per-class IoU: {r['label']} (mean over seeds)", "",
                "| class | CAM | pseudo | seg |" + (" reference seg | seg gap |" if ref_seg else ""),
                "|---|---|---|---|" + ("---|---|" if ref_seg else "")]  # fmt: skip
        for i, name in enumerate(names):
            vals = [pc[k][i] if k in pc else float("nan") for k in ("cam", "pseudo", "seg")]
            if ref_seg:
                vals += [ref_seg[i], vals[2] - ref_seg[i]]
            out.append(f"| {name} | " + " | ".join("-" if math.isnan(v) else f"{100 * v:.1f}" for v in vals) + " |")
        out.append("")
    return out


def plot(quality: dict, path: str) -> None:
    """Bar plot (PNG) of CAM, pseudo-label and seg mIoU per row, mean with ± std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, summ = quality["rows"], quality["summary"]
    keys = ("cam", "pseudo", "seg")
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(rows) + 1.5), 3.6), dpi=120)
    width = 0.8 / len(keys)
    for j, k in enumerate(keys):
        means = [100 * summ[r["label"]][k]["mean"] for r in rows]
        stds = [100 * summ[r["label"]][k]["std"] for r in rows]
        stds = [0.0 if math.isnan(s) else s for s in stds]
        xs = [i + (j - 1) * width for i in range(len(rows))]
        ax.bar(xs, [0.0 if math.isnan(m) else m for m in means], width, yerr=stds, capsize=2, label=LABELS[k])
    ax.set_xticks(range(len(rows)), [r["label"] for r in rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("val mIoU (%)")
    ax.set_title(f"seeds {', '.join(str(s) for s in quality['seeds'])}; {quality['backbone']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
