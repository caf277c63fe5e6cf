"""A second augmented view of a training batch, cut on the device, with its geometry kept for warping maps."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchvision.ops import roi_align

from wsss.data.transforms import adjust_colour, denormalize, gaussian_blur, grayscale, normalize


@dataclass
class View:
    """``image`` (B, 3, S, S) normalised; ``boxes`` (B, 4) x1 y1 x2 y2 in source pixels; ``flips`` (B,) bool."""

    image: torch.Tensor
    boxes: torch.Tensor
    flips: torch.Tensor

    def warp(self, maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Maps (B, C, H', W') aligned with the source batch, resampled into this view at ``size``."""
        src = self.image.shape[-1]
        scale = maps.shape[-1] / src
        B = maps.shape[0]
        rois = torch.cat([torch.arange(B, device=maps.device, dtype=maps.dtype)[:, None], self.boxes.to(maps)], 1)
        out = roi_align(maps, rois, output_size=size, spatial_scale=scale, sampling_ratio=2, aligned=True)
        return torch.where(self.flips[:, None, None, None], out.flip(-1), out)


def random_resized_view(
    x: torch.Tensor, gen: torch.Generator | None = None, scale: tuple[float, float] = (0.32, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True, jitter: float = 0.4, p_jitter: float = 0.5,
    p_gray: float = 0.0, p_blur: float = 0.0, p_solarize: float = 0.0, blur_sigma: tuple[float, float] = (0.1, 2.0),
) -> View:  # fmt: skip
    """RandomResizedCrop (area ``scale``, aspect ``ratio``) of each image of x (B, 3, S, S), resized back
    to S, flipped with probability 1/2 and colour-jittered (brightness and contrast ``jitter``, saturation
    ``jitter / 2``; FSR's ColorJitter(0.4, 0.4, 0.2) with probability ``p_jitter``; no hue jitter); then,
    each with its probability, greyscale, a Gaussian blur of radius uniform in ``blur_sigma`` pixels and
    solarisation (values >= 0.5 inverted), ToCo's second view: 0.2, 0.1, 0.2 (FSR's view: none).
    All random numbers come from ``gen`` (one draw per image, no loop); the blur radius and the
    solarisation are drawn only when switched on, so views without them keep their random stream."""
    B, _, H, W = x.shape
    dev = x.device
    u = torch.rand(B, 8, generator=gen, device=dev)
    area = (scale[0] + (scale[1] - scale[0]) * u[:, 0]) * H * W
    logr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    w = (area * logr.exp()).sqrt().clamp(max=W)
    h = (area / logr.exp()).sqrt().clamp(max=H)
    x0, y0 = (W - w) * u[:, 2], (H - h) * u[:, 3]
    boxes = torch.stack([x0, y0, x0 + w, y0 + h], 1)
    rois = torch.cat([torch.arange(B, device=dev, dtype=x.dtype)[:, None], boxes.to(x.dtype)], 1)
    img = roi_align(x, rois, output_size=(H, W), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    flips = (u[:, 4] < 0.5) if flip else torch.zeros(B, dtype=torch.bool, device=dev)
    img = torch.where(flips[:, None, None, None], img.flip(-1), img)
    colour = p_gray > 0 or p_blur > 0 or p_solarize > 0
    # one trip to RGB and back however many colour operations an image gets (each trip rounds)
    rgb = denormalize(img) if jitter > 0 or colour else img
    if jitter > 0:
        on = (u[:, 5] < p_jitter)[:, None, None, None]
        f = torch.rand(B, 3, generator=gen, device=dev) * 2 - 1
        b, c, s = (1 + jitter * f[:, 0]), (1 + jitter * f[:, 1]), (1 + jitter / 2 * f[:, 2])
        rgb = torch.where(on, adjust_colour(rgb, *(v[:, None, None, None] for v in (b, c, s))), rgb)
        if not colour:
            img = torch.where(on, normalize(rgb), img)
    if colour:
        if p_gray > 0:
            rgb = torch.where((u[:, 6] < p_gray)[:, None, None, None], grayscale(rgb), rgb)
        if p_blur > 0:
            sigma = blur_sigma[0] + (blur_sigma[1] - blur_sigma[0]) * torch.rand(B, generator=gen, device=dev)
            on = u[:, 7] < p_blur
            if bool(on.any()):  # only the chosen images are blurred (ToCo's second view: 1 in 10)
                rgb = rgb.clone()
                rgb[on] = gaussian_blur(rgb[on], sigma[on])
        if p_solarize > 0:
            sol = (torch.rand(B, generator=gen, device=dev) < p_solarize)[:, None, None, None]
            rgb = torch.where(sol & (rgb >= 0.5), 1 - rgb, rgb)
        img = normalize(rgb)
    return View(img, boxes, flips)
