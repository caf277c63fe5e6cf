"""Evaluators for segmentation predictions, CAMs and pseudo labels (reset / process / compute).

CAM protocol: CAMs of the ground-truth image classes only, a constant background threshold
(``bkg_thre``); the oracle sweep over thresholds uses the ground truth to pick the best one and is
reported separately, labelled as such. Pseudo labels: scored with 255 counted as background, and with
255 excluded (plus its coverage). A split without masks is scored at the tag level (``tags``: the
model's image-level class scores against the image tags), so a run on tags alone can be judged.
"""

from __future__ import annotations

import math

import torch

from wsss.cam.labels import cam_to_label
from wsss.data.classes import ClassSpec
from wsss.evaluation.confusion import ConfusionMatrix
from wsss.evaluation.inference import predict_probs
from wsss.utils.dist import all_reduce_sum

SWEEP = tuple(round(0.05 * i, 2) for i in range(1, 20))


class SegEvaluator:
    """mIoU of argmax seg logits against masks."""

    key = "seg"

    def __init__(self, classes: ClassSpec) -> None:
        self.classes = classes
        self.reset()

    def reset(self) -> None:
        """Start a new pass."""
        self.cm = ConfusionMatrix(self.classes.K, self.classes.ignore_index)

    def process(self, batch: dict, outputs: dict) -> None:
        """outputs["seg"]: (B, K, H, W) logits or probabilities; batch["mask"]: (B, H, W)."""
        self.cm.update(outputs["seg"].max(1).indices.cpu(), batch["mask"])

    def compute(self) -> dict:
        """Metrics dict (see ConfusionMatrix.compute) plus ``confusion``: (K, K) pixel counts, rows ground truth,
        columns prediction (for ``wsss report``); with a background class, ``fg_share``: the predicted and
        the ground-truth foreground shares of the scored pixels (a head painting beyond the objects shows
        here before it shows in the IoU)."""
        cm = self.cm.reduce()
        out = {**cm.compute(), "confusion": cm.mat.tolist()}
        if self.classes.background:
            sh = cm.foreground_shares()
            out["fg_share"] = {"pred": sh["fg"], "gt": sh["gt_fg"]}
        return out


class CAMEvaluator:
    """CAMs as labels at a fixed background threshold, plus the oracle threshold sweep."""

    key = "cam"

    def __init__(self, classes: ClassSpec, bkg_thre: float = 0.5, sweep: bool = True) -> None:
        self.classes, self.bkg, self.sweep = classes, bkg_thre, sweep
        self.reset()

    def reset(self) -> None:
        """Start a new pass."""
        thr = sorted({self.bkg, *(SWEEP if self.sweep else ())})
        self.cms = {t: ConfusionMatrix(self.classes.K, self.classes.ignore_index) for t in thr}

    def process(self, batch: dict, outputs: dict) -> None:
        """outputs["cam"]: (B, C, H, W) in [0, 1]; uses batch["tags"] (ground-truth classes)."""
        cam, tags = outputs["cam"].cpu(), batch["tags"].cpu()
        for t, cm in self.cms.items():
            cm.update(cam_to_label(cam, tags, self.classes, bkg=t), batch["mask"])

    def compute(self) -> dict:
        """Metrics at ``bkg_thre``; with the sweep, ``oracle_sweep`` {thre: miou} and its best."""
        res = {t: cm.reduce().compute() for t, cm in self.cms.items()}
        out = dict(res[self.bkg], bkg_thre=self.bkg)
        if self.sweep:
            curve = {t: r["miou"] for t, r in res.items() if t in SWEEP}
            best = max(curve, key=lambda t: -1 if math.isnan(curve[t]) else curve[t])
            out["oracle_sweep"] = {"thresholds": curve, "best_thre": best, "best_miou": curve[best],
                                   "note": "oracle: threshold chosen with ground truth"}  # fmt: skip
        return out


class PseudoLabelEvaluator:
    """Pseudo labels (255 = ignore) scored two ways: 255 as background, and 255 excluded."""

    key = "pseudo"

    def __init__(self, classes: ClassSpec) -> None:
        self.classes = classes
        self.reset()

    def reset(self) -> None:
        """Start a new pass."""
        K, ig = self.classes.K, self.classes.ignore_index
        self.as_bg, self.excl = ConfusionMatrix(K, ig), ConfusionMatrix(K, ig)

    def process(self, batch: dict, outputs: dict) -> None:
        """outputs["pseudo"]: (B, H, W) labels."""
        lab = outputs["pseudo"].cpu()
        self.excl.update(lab, batch["mask"])  # 255 falls in the abstain column
        if self.classes.background:
            self.as_bg.update(torch.where(lab == self.classes.ignore_index, 0, lab), batch["mask"])

    def compute(self) -> dict:
        """Metrics with 255 as background (main), plus ``ignored_excluded`` and its coverage."""
        ex = self.excl.reduce().compute()
        tp = self.excl.mat.double().diag()
        answered = self.excl.mat.double()
        prec_iou = tp / (answered.sum(1) + answered.sum(0) - tp)  # 255 pixels left out entirely
        excl = {"miou": float(torch.nanmean(prec_iou)), "coverage": ex["coverage"], "iou": prec_iou.tolist()}
        main = self.as_bg.reduce().compute() if self.classes.background else ex
        out = dict(main, ignored_excluded=excl)
        if self.classes.background:  # labelled foreground and the ignore band, apart
            sh = self.excl.foreground_shares()
            out["fg_share"] = {"pred": sh["fg"], "gt": sh["gt_fg"], "band": sh["abstain"]}
        return out


class TagEvaluator:
    """Image-level tags: per-class average precision (its mean over the classes with a positive image is
    ``map``) and F1 at score ``threshold`` (macro ``f1`` over the classes that are tagged or predicted).

    Scores are counted in ``bins`` equal bins of [0, 1] per class, positives and negatives apart, so that
    processes add counts (DDP) instead of gathering scores. AP sums precision x recall gained over the
    thresholds from the top bin down (scikit-learn's average_precision_score, exactly so when no two
    images of a class share a bin; images in one bin count as tied).
    """

    key = "tags"

    def __init__(self, classes: ClassSpec, threshold: float = 0.5, bins: int = 1000) -> None:
        self.classes, self.threshold, self.bins = classes, threshold, bins
        self.reset()

    def reset(self) -> None:
        """Start a new pass."""
        self.counts = torch.zeros(2, self.classes.num_fg, self.bins, dtype=torch.int64)  # (neg/pos, C, bins)

    def process(self, batch: dict, outputs: dict) -> None:
        """outputs["tags"]: (B, C) scores in [0, 1]; batch["tags"]: (B, C) multi-hot ground truth."""
        s, t = outputs["tags"].float().cpu().clamp(0, 1), batch["tags"].cpu().long()
        b = (s * self.bins).floor().long().clamp_(max=self.bins - 1)  # bin i holds [i, i + 1) / bins
        C = s.shape[1]
        idx = (t * C + torch.arange(C)) * self.bins + b  # (B, C) flat index into counts
        self.counts += torch.bincount(idx.flatten(), minlength=self.counts.numel()).view_as(self.counts)

    def compute(self) -> dict:
        """{"map", "ap" (C,), "f1", "f1_per_class" (C,), "threshold", "images"}; NaN for a class without
        a positive image (AP) or without positives and predictions (F1)."""
        all_reduce_sum(self.counts)
        neg, pos = self.counts.double()
        n_pos = pos.sum(1)
        tp, fp = pos.flip(1).cumsum(1), neg.flip(1).cumsum(1)  # at each threshold, from the top bin down
        prec = torch.where(tp + fp > 0, tp / (tp + fp).clamp(min=1), torch.zeros_like(tp))
        ap = (prec * pos.flip(1)).sum(1) / n_pos
        ap = torch.where(n_pos > 0, ap, torch.full_like(ap, float("nan")))
        cut = round(self.threshold * self.bins)
        tp1, fp1 = pos[:, cut:].sum(1), neg[:, cut:].sum(1)
        denom = 2 * tp1 + fp1 + (n_pos - tp1)
        f1 = torch.where(denom > 0, 2 * tp1 / denom.clamp(min=1), torch.full_like(denom, float("nan")))
        return {"map": float(torch.nanmean(ap)), "ap": ap.tolist(), "f1": float(torch.nanmean(f1)),
                "f1_per_class": f1.tolist(), "threshold": self.threshold,
                "images": int(self.counts[:, 0].sum())}  # fmt: skip


def headline(results: dict) -> dict[str, float]:
    """The one-number scores of ``results`` ({key: metrics}) for logs: ``<key>_miou`` for the mask
    evaluators, ``tags_map`` and ``tags_f1`` for the tag level."""
    out = {}
    for k, v in results.items():
        if "miou" in v:
            out[f"{k}_miou"] = v["miou"]
        else:
            out.update({f"{k}_map": v["map"], f"{k}_f1": v["f1"]})
    return out


def build_evaluators(method, classes: ClassSpec, ecfg, which: tuple[str, ...]) -> list:
    """The evaluators of ``which`` (seg, cam, pseudo: masks needed; tags: tags only) that ``method`` supports."""
    evs: list[TagEvaluator | SegEvaluator | CAMEvaluator | PseudoLabelEvaluator] = []
    if "tags" in which:
        evs.append(TagEvaluator(classes))
    if "seg" in which:
        evs.append(SegEvaluator(classes))
    if method.has_cams and "cam" in which:
        evs.append(CAMEvaluator(classes, ecfg.bkg_thre, ecfg.sweep))
    if method.has_cams and "pseudo" in which:
        evs.append(PseudoLabelEvaluator(classes))
    return evs


@torch.no_grad()
def run_evaluation(
    method, loader, classes: ClassSpec, ecfg, device, which=("seg", "cam", "pseudo"), progress=None
) -> dict:
    """Evaluate ``method`` over ``loader`` (batches with masks, except for ``which`` = ("tags",)); returns
    {key: metrics}."""
    evs = build_evaluators(method, classes, ecfg, which)
    was_training = method.training
    method.eval()
    for batch in progress(loader) if progress else loader:
        x = batch["image"].to(device)
        tags = batch["tags"].to(device)
        outputs = {}
        if any(e.key == "tags" for e in evs):
            outputs["tags"] = method.predict_tags(x)
        if any(e.key == "seg" for e in evs):
            outputs["seg"] = predict_probs(method, x, ecfg)  # argmax-equivalent to the logits
        if any(e.key in ("cam", "pseudo") for e in evs):
            cam = method.predict_cams(x, tags)
            outputs["cam"] = cam
            if any(e.key == "pseudo" for e in evs):
                outputs["pseudo"] = method.pseudo_labels(x, tags, batch["valid"].to(device), cams=cam)
        for e in evs:
            e.process(batch, outputs)
    method.train(was_training)
    return {e.key: e.compute() for e in evs}


def format_table(results: dict, classes: ClassSpec) -> str:
    """Per-class IoU table (rows: classes, columns: evaluated outputs) plus mIoU lines; the tag level as a
    per-class AP / F1 table."""
    keys = [k for k in results if "iou" in results[k]]
    if not keys:
        return _format_tags(results["tags"], classes) if "tags" in results else ""
    head = f"{'class':<16}" + "".join(f"{k:>10}" for k in keys)
    lines = [head, "-" * len(head)]
    for i, name in enumerate(classes.seg_names):
        row = f"{name[:16]:<16}"
        for k in keys:
            v = results[k]["iou"][i]
            row += f"{'-' if math.isnan(v) else f'{100 * v:.1f}':>10}"
        lines.append(row)
    lines.append("-" * len(head))
    lines.append(f"{'mIoU':<16}" + "".join(f"{100 * results[k]['miou']:>10.2f}" for k in keys))
    lines.append(f"{'pixel acc':<16}" + "".join(f"{100 * results[k]['pixel_acc']:>10.2f}" for k in keys))
    if "cam" in results and "oracle_sweep" in results["cam"]:
        o = results["cam"]["oracle_sweep"]
        lines.append(
            f"CAM oracle sweep (uses ground truth): best bkg_thre {o['best_thre']:.2f} "
            f"-> mIoU {100 * o['best_miou']:.2f}"
        )
    if "pseudo" in results:
        e = results["pseudo"]["ignored_excluded"]
        lines.append(
            f"pseudo labels with 255 excluded: mIoU {100 * e['miou']:.2f} at coverage {100 * e['coverage']:.1f}%"
        )
    shares = [(k, results[k]["fg_share"]) for k in ("seg", "pseudo") if "fg_share" in results.get(k, {})]
    if shares:
        parts = [f"ground truth {100 * shares[0][1]['gt']:.1f}%"] + [f"{k} {100 * sh['pred']:.1f}%" for k, sh in shares]
        parts += [f"pseudo band {100 * sh['band']:.1f}%" for k, sh in shares if k == "pseudo"]
        lines.append("foreground pixels: " + ", ".join(parts))
    return "\n".join(lines)


def _format_tags(res: dict, classes: ClassSpec) -> str:
    head = f"{'class':<16}{'AP':>10}{'F1':>10}"
    lines = [head, "-" * len(head)]
    for name, ap, f1 in zip(classes.names, res["ap"], res["f1_per_class"]):
        cells = "".join(f"{'-' if math.isnan(v) else f'{100 * v:.1f}':>10}" for v in (ap, f1))
        lines.append(f"{name[:16]:<16}{cells}")
    lines.append("-" * len(head))
    lines.append(f"tag level ({res['images']} images, no masks): mAP {100 * res['map']:.2f}, "
                 f"F1 {100 * res['f1']:.2f} at score {res['threshold']:.2f}")  # fmt: skip
    return "\n".join(lines)
