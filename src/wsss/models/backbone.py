"""timm ViT wrapper: patch tokens as NCHW maps, intermediate layers, optional attention maps.

The block loop is ours (not ``forward_features``) so that method modules can hook in after any block
(``block_hooks``) and before the blocks (the ``embed_hook`` argument of one pass, e.g. token masking).
Weights, in order of precedence: a file path in the config; ``$WSSS_WEIGHTS`` when the config asks for
pretrained (``timm``); timm's own pretrained download and cache; else random init with a warning. The source
used is recorded in ``weights_source`` and written into the run's env.json.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from wsss.registry import BACKBONES

log = logging.getLogger(__name__)


@dataclass
class BackboneOutput:
    """``feat`` (B, D, h, w) final normed patch map; ``layers`` {index: (B, D, h, w)} pre-norm maps
    of requested blocks; ``prefix`` (B, P, D) final class/register tokens; ``attn`` {index: (B, heads,
    T, T)} attention maps of requested blocks (token order: prefix, h*w patches, extra); ``extra``
    (B, E, D) final normed tokens that block hooks appended after the patches (e.g. class tokens);
    ``maps`` {name: (B, D, h, w)} named maps that pipeline modules record while refining ``feat``."""

    feat: torch.Tensor
    layers: dict[int, torch.Tensor]
    prefix: torch.Tensor
    attn: dict[int, torch.Tensor]
    extra: torch.Tensor | None = None
    maps: dict[str, torch.Tensor] = field(default_factory=dict)


def split_output(out: BackboneOutput, n: int) -> tuple[BackboneOutput, BackboneOutput]:
    """The first ``n`` images' output and the rest's, as views of ``out`` (one batched pass of two inputs
    of the same size costs less than two passes)."""

    def part(sl: slice) -> BackboneOutput:
        return BackboneOutput(
            out.feat[sl], {k: v[sl] for k, v in out.layers.items()}, out.prefix[sl],
            {k: v[sl] for k, v in out.attn.items()}, None if out.extra is None else out.extra[sl],
            {k: v[sl] for k, v in out.maps.items()},
        )  # fmt: skip

    return part(slice(0, n)), part(slice(n, None))


def resolve_weights(weights: str) -> tuple[str | None, str]:
    """(local file or None, source label) for a config ``weights`` value: timm | none | PATH."""
    if weights in ("none", "", None):
        return None, "none (random init, by config)"
    if weights != "timm":
        p = Path(weights).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"{p}: weights file not found (model.weights)")
        return str(p), f"file:{p}"
    env = os.environ.get("WSSS_WEIGHTS")
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"{p}: weights file not found (WSSS_WEIGHTS)")
        return str(p), f"file:{p} (WSSS_WEIGHTS)"
    return None, "timm"


def check_weights_fit(name: str, file: str, **kw) -> None:
    """Raise ConfigError, naming the file and the backbone, when the weights in ``file`` (after the
    model family's own checkpoint filter: layout conversion, position-embedding and patch resampling)
    have tensors the model lacks, lack some of its tensors, or differ in shape. timm itself only logs
    such keys and loads the rest, so a DINOv2 file given to a DeiT would train silently without its
    layer scales. The model is built on the meta device: no memory, no initialisation."""
    import sys

    import timm
    from timm.models import load_state_dict

    from wsss.config import ConfigError

    kw = {k: v for k, v in kw.items() if k not in ("features_only", "out_indices", "output_stride")}
    with torch.device("meta"):
        model: Any = timm.create_model(name, pretrained=False, **{**kw, "num_classes": 0})  # timm attrs vary
    try:
        sd = load_state_dict(file)
    except Exception as e:  # not a state dict at all
        raise ConfigError(f"{file}: not a weights file timm can read ({type(e).__name__}: {e})") from None
    filt = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filt is not None:
        sd = filt(sd, model)
    heads = (model.pretrained_cfg or {}).get("classifier") or "head"
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    have = model.state_dict()
    extra = [k for k in sd if k not in have and not any(k.startswith(f"{h}.") for h in heads)]
    lack = [k for k in have if k not in sd]
    shape = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(have[k].shape)}" for k in sd if k in have and sd[k].shape != have[k].shape
    ]
    if extra or lack or shape:
        parts = [f"{len(v)} {what} (e.g. {', '.join(v[:3])})" for v, what in (
            (extra, "tensors the backbone has no place for"), (lack, "of its tensors missing from the file"),
            (shape, "tensors of another shape, file vs backbone")) if v]  # fmt: skip
        raise ConfigError(f"{file}: these weights do not fit backbone '{name}': {'; '.join(parts)}. Give the "
                          "backbone the file was saved from (model.backbone) or another file (model.weights, "
                          "WSSS_WEIGHTS)")  # fmt: skip


def create_timm(name: str, weights: str, **kw) -> tuple[nn.Module, str]:
    """``timm.create_model(name, **kw)`` with weights from a file, timm's download, or none (see
    :func:`resolve_weights`); an unavailable download falls back to random init with a warning. A file
    must fit the backbone exactly (:func:`check_weights_fit`). Returns (model, source label)."""
    import timm

    file, source = resolve_weights(weights)
    if file is not None:
        check_weights_fit(name, file, **kw)
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=file), **kw), source
    if source != "timm":
        return timm.create_model(name, pretrained=False, **kw), source
    try:
        return timm.create_model(name, pretrained=True, **kw), "timm pretrained"
    except Exception as e:  # offline, unknown tag, hub error: fall back, loudly
        log.warning(
            "could not get pretrained weights for %s (%s: %s); RANDOM INIT. Give a local file with "
            "model.weights=PATH or WSSS_WEIGHTS=PATH.",
            name,
            type(e).__name__,
            str(e).splitlines()[0][:200],
        )
        return timm.create_model(name, pretrained=False, **kw), "none (random init: pretrained weights unavailable)"


class ViTBackbone(nn.Module):
    """A timm VisionTransformer used as a patch-token encoder.

    Args:
        name: timm model name (e.g. ``vit_base_patch16_224``, ``vit_small_patch14_dinov2``).
        weights: ``timm`` | ``none`` | path to a local weights file.
        img_size: position-embedding grid size the model is built for (resampled from the weights).
        drop_path: stochastic depth rate.
        freeze_blocks: freeze the embeddings and the first N blocks (no gradient, no optimizer state).
    """

    def __init__(
        self, name: str, weights: str = "timm", img_size: int = 224, drop_path: float = 0.0, freeze_blocks: int = 0
    ) -> None:
        super().__init__()

        kw = dict(num_classes=0, img_size=img_size, dynamic_img_size=True, drop_path_rate=drop_path)
        self.vit: Any  # a timm VisionTransformer: its attributes (blocks, patch_embed, ...) vary by family
        self.vit, source = create_timm(name, weights, **kw)
        self.weights_source = source
        self.embed_dim: int = self.vit.embed_dim
        self.depth = len(self.vit.blocks)
        self.dims: list[int] = [self.embed_dim] * self.depth  # channels of each block's map in ``layers``
        self.num_prefix = self.vit.num_prefix_tokens
        self.num_heads: int = self.vit.blocks[0].attn.num_heads
        ps = self.vit.patch_embed.patch_size
        self.patch_size: int = ps[0] if isinstance(ps, (tuple, list)) else ps
        if freeze_blocks > 0:
            frozen = [self.vit.patch_embed, *self.vit.blocks[:freeze_blocks]]
            for mod in frozen:
                mod.requires_grad_(False)
            for name_ in ("pos_embed", "cls_token", "reg_token"):
                if getattr(self.vit, name_, None) is not None:
                    getattr(self.vit, name_).requires_grad_(False)
        # block index -> [fn(x (B, T, D), hw) -> x]; a hook may append tokens after the patches
        self.block_hooks: dict[int, list] = {}
        # block index -> fn(blk, x (B, T, D), n_app) -> x run instead of blk(x) while n_app > 0 tokens
        # are appended after the patches (class tokens' gated read-back)
        self.block_runners: dict[int, Callable[[nn.Module, torch.Tensor, int], torch.Tensor]] = {}

    def _index(self, i: int) -> int:
        return i % self.depth

    def forward(
        self, x: torch.Tensor, layers: tuple[int, ...] = (), attn_layers: tuple[int, ...] = (), embed_hook=None
    ) -> BackboneOutput:
        """Encode images (B, 3, H, W); ``layers`` / ``attn_layers`` are block indices (negatives allowed);
        ``embed_hook`` fn(tokens (B, h, w, D)) -> tokens runs before the position embedding (token masking)."""
        vit = self.vit
        p = self.patch_size
        H, W = x.shape[-2:]
        exporting = torch.compiler.is_exporting() or torch.jit.is_tracing()
        if exporting or H % p or W % p:
            # Resize (not pad) to the nearest patch multiple: the token grid then spans exactly the image,
            # so maps upsampled back to (H, W) stay aligned. An exported (ONNX) or traced graph always
            # resizes, a no-op at multiples, so one graph serves every size; its integer rounding sends
            # exact halves up where Python's round() goes to even (sides of (2k + 0.5) * p only).
            if exporting:
                size = (max(p, (H + p // 2) // p * p), max(p, (W + p // 2) // p * p))
            else:
                size = (max(p, round(H / p) * p), max(p, round(W / p) * p))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        want = {self._index(i) for i in layers}
        want_attn = {self._index(i) for i in attn_layers}
        t = vit.patch_embed(x)  # (B, h, w, D) with dynamic_img_size
        h, w = t.shape[1], t.shape[2]
        if embed_hook is not None:
            t = embed_hook(t)
        t = vit._pos_embed(t)
        t = vit.patch_drop(t)
        t = vit.norm_pre(t)
        out_layers, out_attn = {}, {}
        P = self.num_prefix
        for i, blk in enumerate(vit.blocks):
            if i in want_attn:
                out_attn[i] = attention_map(blk, t)
            n_app = t.shape[1] - P - h * w
            t = self.block_runners[i](blk, t, n_app) if n_app > 0 and i in self.block_runners else blk(t)
            for fn in self.block_hooks.get(i, ()):
                t = fn(t, (h, w))
            if i in want:
                out_layers[i] = _to_map(t[:, P:], h, w)
        t = vit.norm(t)
        return BackboneOutput(_to_map(t[:, P:], h, w), out_layers, t[:, :P], out_attn, t[:, P + h * w :])


def _to_map(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    B, N, D = tokens.shape
    return tokens[:, : h * w].transpose(1, 2).reshape(B, D, h, w)


def attention_map(blk: Any, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention (B, heads, T, T) that timm block ``blk`` computes on input tokens ``x``.

    Recomputed from the block's own qkv projection, so fused attention can stay on for the forward.
    """
    attn = blk.attn
    B, T, _ = x.shape
    qkv = attn.qkv(blk.norm1(x)).reshape(B, T, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)


@BACKBONES.register("vit")
def build_vit(cfg) -> ViTBackbone:
    """Backbone from a ModelConfig-like object (backbone, weights, img_size, drop_path)."""
    return ViTBackbone(cfg.backbone, cfg.weights, cfg.img_size, cfg.drop_path, cfg.freeze_blocks)
