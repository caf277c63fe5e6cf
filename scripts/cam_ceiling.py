"""How good can a CAM of this backbone be on this data? A frozen-feature linear probe (a diagnostic).

The backbone of a recipe stays frozen; a bias-free 1x1 classifier (the CAM head) is trained on the
train split's tags from its patch tokens, with one of three poolings, and its CAMs are scored on the
val split exactly as ``wsss evaluate --which cam`` scores them (each present class max-normalised,
background at a fixed threshold, the ground-truth tags given). Input sides other than the images' own
are bilinear resizes, so the token grid grows with the side (patch 14: 112 px -> 8 x 8, 224 -> 16 x 16).

Usage (figures in docs/benchmarks.md):
    WSSS_WEIGHTS=FILE python scripts/cam_ceiling.py --config configs/bench/toco.yaml --sides 112,224 --layers=-1,7
    (add any --key value override of the recipe after the options, e.g. --data.root data/demo)

It trains the classifier full-batch on cached tokens (AdamW, lr 1e-3, ``--epochs``), so a probe of
400 images takes about a minute on a 2-core CPU; nothing is written.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from wsss.build import build_eval_dataset
from wsss.config import load_config
from wsss.data.loader import eval_loader
from wsss.evaluation.confusion import ConfusionMatrix
from wsss.models.backbone import ViTBackbone

POOLS = ("gmp", "gap", "top10")
THRESHOLDS = (0.3, 0.4, 0.5, 0.6)


def pooled_logits(conv: torch.nn.Conv2d, feat: torch.Tensor, pool: str) -> torch.Tensor:
    """Image logits (N, C) of tokens (N, D, h, w): classify the max / mean token, or average the top 10 %."""
    if pool == "gmp":
        return conv(feat.amax((2, 3), keepdim=True)).flatten(1)
    if pool == "gap":
        return conv(feat.mean((2, 3), keepdim=True)).flatten(1)
    logits = conv(feat).flatten(2)
    return logits.topk(max(1, round(0.1 * logits.shape[-1])), -1).values.mean(-1)


@torch.no_grad()
def encode(bb: ViTBackbone, ds, side: int, layer: int):
    """Tokens (N, D, h, w) of every image resized to ``side``, with tags (N, C) and masks (N, H, W)."""
    feats, tags, masks = [], [], []
    for b in eval_loader(ds, 1, 0, 1, 0):  # batch 1: the images may differ in size
        x = F.interpolate(b["image"], size=(side, side), mode="bilinear", align_corners=False)
        out = bb(x, layers=(layer,))
        feats.append(out.feat if layer == -1 else out.layers[layer % bb.depth])
        tags.append(b["tags"])
        masks.append(b.get("mask"))
    return torch.cat(feats), torch.cat(tags).float(), masks


def probe(train, val, pool: str, classes, epochs: int) -> dict[float, float]:
    """Train a CAM head on ``train`` tokens; val CAM mIoU (%) at each background threshold."""
    (ftr, ttr, _), (fva, tva, mva) = train, val
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(ftr.shape[1], ttr.shape[1], 1, bias=False)
    opt = torch.optim.AdamW(conv.parameters(), lr=1e-3, weight_decay=1e-2)
    for _ in range(epochs):
        loss = F.multilabel_soft_margin_loss(pooled_logits(conv, ftr, pool), ttr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    cms = {t: ConfusionMatrix(classes.K, classes.ignore_index) for t in THRESHOLDS}
    with torch.no_grad():
        for i, gt in enumerate(mva):
            cam = F.relu(conv(fva[i : i + 1]))
            cam = F.interpolate(cam, size=gt.shape[-2:], mode="bilinear", align_corners=False)
            cam = cam / (cam.amax((2, 3), keepdim=True) + 1e-5) * tva[i, :, None, None]
            for t, cm in cms.items():
                cm.update(torch.cat([torch.full_like(cam[:, :1], t), cam], 1).argmax(1), gt)
    return {t: 100 * cm.compute()["miou"] for t, cm in cms.items()}


def main() -> None:
    """Parse the options, then print one line per side, block and pooling."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="recipe naming the data and the backbone")
    ap.add_argument("--sides", default="112", help="comma list of input sides")
    ap.add_argument("--layers", default="-1", help="comma list of blocks (-1: final tokens after the norm)")
    ap.add_argument("--epochs", type=int, default=300)
    args, overrides = ap.parse_known_args()
    cfg = load_config(args.config, overrides)
    m = cfg.model
    dtr, dva = build_eval_dataset(cfg, cfg.data.train_split), build_eval_dataset(cfg, cfg.data.val_split)
    classes = dva.classes
    if not classes.background or not dva.load_masks:
        raise SystemExit(f"{cfg.data.root}: the probe needs a background class and masks for the val split")
    for side in (int(s) for s in args.sides.split(",")):
        # position embeddings resampled once, from the weights' grid straight to this side's
        bb = ViTBackbone(m.backbone, m.weights, side).eval()
        for layer in (int(v) for v in args.layers.split(",")):
            train, val = encode(bb, dtr, side, layer), encode(bb, dva, side, layer)
            for pool in POOLS:
                res = probe(train, val, pool, classes, args.epochs)
                best = max(res, key=res.get)
                print(f"side {side} layer {layer} pool {pool}: CAM mIoU {res[0.5]:.2f} at 0.5, "
                      f"{res[best]:.2f} at the best threshold {best} (oracle)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
