"""Prediction grids for TensorBoard and reports: image | CAM | pseudo label | seg | ground truth."""

from __future__ import annotations

import numpy as np
import torch

from wsss.viz import cam_overlay, colorize, make_grid


@torch.no_grad()
def prediction_grid(method, dataset, device, n: int = 4) -> np.ndarray:
    """(H_total, W_total, 3) uint8 grid for the first ``n`` images of ``dataset`` (resized to the first's size)."""
    was = method.training
    method.eval()
    pal = dataset.classes.palette
    rows = []
    size = None
    for i in range(min(n, len(dataset))):
        s = dataset[i]
        x = s["image"][None].to(device)
        if size is None:
            size = x.shape[-2:]
        x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
        tags = s["tags"][None].to(device)
        row = [cam_overlay(x[0].cpu(), torch.zeros(size), alpha=0.0)]
        if method.has_cams:
            cam = method.predict_cams(x, tags)
            row.append(cam_overlay(x[0].cpu(), (cam * tags[:, :, None, None]).amax(1)[0].cpu()))
            row.append(colorize(method.pseudo_labels(x, tags, cams=cam)[0].cpu(), pal))
        row.append(colorize(method.predict_seg(x).max(1).indices[0].cpu(), pal))
        if "mask" in s:
            m = torch.nn.functional.interpolate(s["mask"][None, None].float(), size=size, mode="nearest")[0, 0]
            row.append(colorize(m, pal))
        rows.append(row)
    method.train(was)
    return make_grid(rows)
