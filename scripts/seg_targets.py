"""Does a run's seg head learn its own pseudo labels? A diagnostic of finished runs (nothing is written).

For the val and train splits of each run (whole images, single scale), in %:

- ``seg``: seg mIoU; ``seg_tags``: the same with the logits of the classes absent from the image's
  ground-truth tags removed (what the seg head loses by recognising the wrong classes);
- ``pseudo``: the run's PAR-refined pseudo labels (ground-truth tags, 255 scored as background);
- ``seg_vs_pseudo`` / ``acc_vs_pseudo``: mIoU and pixel accuracy of the seg prediction against the
  pseudo labels on their labelled pixels (the band is left out): whether the head fits its targets;
- ``fg_gt``, ``fg_pseudo`` (labelled foreground), ``fg_seg``: foreground shares of the scored pixels;
  ``band``: the pseudo labels' ignore band, ``fg_seg_in_band``: seg foreground inside it,
  ``fg_seg_on_pseudo_bg``: seg foreground where the pseudo label says background.

Needs a dataset with a background class and val masks.

Usage (figures in docs/benchmarks.md): python scripts/seg_targets.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import sys

import torch

from wsss.api import load_run
from wsss.build import build_eval_dataset
from wsss.data.loader import eval_loader
from wsss.evaluation.confusion import ConfusionMatrix


@torch.no_grad()
def split_figures(method, cfg, classes, split: str) -> dict[str, float]:
    """The figures above (name -> %) for one split of one run; images (1, 3, H, W) one at a time."""
    K, ig = classes.K, classes.ignore_index
    cms = {k: ConfusionMatrix(K, ig) for k in ("seg", "seg_tags", "pseudo", "seg_vs_pseudo")}
    count = dict.fromkeys(("gt", "seg", "pseudo", "band", "seg_in_band", "seg_on_pseudo_bg", "n"), 0)
    dev = next(method.parameters()).device
    for b in eval_loader(build_eval_dataset(cfg, split), 1, 0, 1, 0):
        x, tags, gt = b["image"].to(dev), b["tags"].to(dev), b["mask"].to(dev)
        logits = method.predict_seg(x)
        pred = logits.argmax(1)
        present = torch.cat([torch.ones_like(tags[:, :1]), tags], 1).bool()[:, :, None, None]
        pl = method.pseudo_labels(x, tags, b["valid"].to(dev))
        cms["seg"].update(pred, gt)
        cms["seg_tags"].update(logits.masked_fill(~present, float("-inf")).argmax(1), gt)
        cms["pseudo"].update(torch.where(pl == ig, 0, pl), gt)
        cms["seg_vs_pseudo"].update(pred, pl)
        v = gt != ig
        count["gt"] += int(((gt > 0) & v).sum())
        count["seg"] += int(((pred > 0) & v).sum())
        count["pseudo"] += int(((pl > 0) & (pl != ig) & v).sum())
        count["band"] += int(((pl == ig) & v).sum())
        count["seg_in_band"] += int(((pred > 0) & (pl == ig) & v).sum())
        count["seg_on_pseudo_bg"] += int(((pred > 0) & (pl == 0) & v).sum())
        count["n"] += int(v.sum())
    out = {k: round(100 * cm.compute()["miou"], 2) for k, cm in cms.items()}
    out["acc_vs_pseudo"] = round(100 * cms["seg_vs_pseudo"].compute()["pixel_acc"], 1)
    share = {f"fg_{k}": count[k] for k in ("gt", "pseudo", "seg", "seg_in_band", "seg_on_pseudo_bg")}
    out.update({k: round(100 * n / max(1, count["n"]), 1) for k, n in (share | {"band": count["band"]}).items()})
    return out


def main(targets: list[str]) -> None:
    """Print the figures of the val and train splits of each run directory in ``targets``."""
    for target in targets:
        cfg, method, classes, _, _ = load_run(target)
        if not classes.background:
            raise SystemExit(f"{target}: the figures need a background class")
        method.eval()
        for split in (cfg.data.val_split, cfg.data.train_split):
            print(target, split, split_figures(method, cfg, classes, split), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
