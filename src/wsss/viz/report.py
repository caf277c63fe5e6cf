"""Prediction grids for TensorBoard and reports: image | CAM | pseudo label | seg | ground truth."""

from __future__ import annotations

import numpy as np
import torch

from wsss.viz import cam_overlay, colorize, make_grid


@torch.no_grad()
def sample_panels(method, x: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor | None, palette) -> dict:
    """The panels of one normalised image ``x`` (1, 3, H, W) with tags (1, C): "image", "ground truth" (when
    ``mask`` (H, W) is given), "CAM" (of the tagged classes) and "pseudo label" (methods with CAMs),
    "prediction"; each a (3, H, W) uint8 tile, in that order."""
    panels = {"image": cam_overlay(x[0].cpu(), torch.zeros(x.shape[-2:]), alpha=0.0)}
    if mask is not None:
        panels["ground truth"] = colorize(mask, palette)
    if method.has_cams:
        cam = method.predict_cams(x, tags)
        panels["CAM"] = cam_overlay(x[0].cpu(), (cam * tags[:, :, None, None]).amax(1)[0].cpu())
        panels["pseudo label"] = colorize(method.pseudo_labels(x, tags, cams=cam)[0].cpu(), palette)
    panels["prediction"] = colorize(method.predict_seg(x).max(1).indices[0].cpu(), palette)
    return panels


@torch.no_grad()
def prediction_grid(method, dataset, device, n: int = 4) -> np.ndarray:
    """(H_total, W_total, 3) uint8 grid for the first ``n`` images of ``dataset`` (resized to the first's size):
    image | CAM | pseudo label | prediction | ground truth."""
    was = method.training
    method.eval()
    rows = []
    size = None
    for i in range(min(n, len(dataset))):
        s = dataset[i]
        x = s["image"][None].to(device)
        if size is None:
            size = x.shape[-2:]
        x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
        m = None
        if "mask" in s:
            m = torch.nn.functional.interpolate(s["mask"][None, None].float(), size=size, mode="nearest")[0, 0]
        panels = sample_panels(method, x, s["tags"][None].to(device), m, dataset.classes.palette)
        rows.append([panels[k] for k in ("image", "CAM", "pseudo label", "prediction", "ground truth") if k in panels])
    method.train(was)
    return make_grid(rows)
