"""``cpf_cte``: context patch fusion (CF-BiLSTM) + class token enhancement on the ToCo pipeline.

The paper publishes the two ideas, not their code or settings; the choices below are ours
(docs/methods.md gives them with their measurements), each a module that stacks on any
recipe with ``method.modules``:

- ``cf_bilstm``: after the blocks in ``blocks`` (default: the last, before the final norm), the patch
  grid goes through :class:`~wsss.models.blocks.bilstm.CFBiLSTM`: bidirectional LSTMs along all rows
  and all columns in two batched calls, a linear fusion of the four directional states, and a
  per-channel residual gate initialised at 0, so training starts from the unchanged backbone. Hidden
  size ``hidden`` (0: D / 4). Its output feeds everything downstream (CAM, aux CAM when attached
  before the aux layer, seg head, token contrast).
- ``class_tokens``: C learnable class tokens appended after the patches before the last ``blocks``
  blocks (default 2). Each final class token gives its class score (own weight vector; multi-label
  soft-margin loss, weight ``w`` 1.0, logged as ``ctk_cls``). The class-to-patch attention of the
  last block, averaged over heads, is fused with the CAM: both are normalised by their per-map max and
  multiplied (``fuse: product``: the token's attention sharpens the CAM where both agree) or averaged
  (``mean``), their geometric mean (``geometric``), or not fused (``none``). With ``fuse_warmup`` N the
  fused map is blended in linearly over the first N optimizer steps, ``(1 - a) cam + a fused``: at
  initialisation the product fusion lowered the share of confident foreground (CAM > 0.7) from 0.166 to
  0.049 on DINOv2 ViT-S/14 features of 16 demo images, so the thresholds of the pseudo labels meant
  something else from the first step. Fusion applies to every CAM the pipeline makes (pseudo labels,
  evaluation), not to the auxiliary CAM that drives the token contrast. The patches read the class
  tokens through a gate per block (``read_gate_init``, default 0: the attention to the tokens is scaled
  by the gate and renormalised, so the backbone's patch output starts as without tokens; 1: timm's
  block). STCL's class-level contrast
  uses these tokens when both modules are on.

New parameters (LSTMs, fusion, gate, tokens, score weights) train at the head learning rate.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar, cast

import torch
import torch.nn as nn

from wsss.config import ConfigError
from wsss.losses.classification import multilabel_loss
from wsss.methods.pipeline import PipelineModule, StepState, block_hooks
from wsss.methods.toco import ToCo
from wsss.models.blocks.bilstm import CFBiLSTM
from wsss.models.blocks.class_tokens import ClassTokens, gated_block
from wsss.registry import METHODS, MODULES

FUSIONS = ("geometric", "product", "mean", "none")


@MODULES.register("cf_bilstm")
class CFBiLSTMModule(PipelineModule):
    """CF-BiLSTM context fusion of the patch grid after chosen backbone blocks."""

    vit_only = True
    uses = "ViT block hooks"

    @dataclass(frozen=True)
    class Config:
        """Where the BiLSTM context is fused in, and its size."""

        blocks: tuple[int, ...] = (-1,)  # attach after these blocks (negative: from the end)
        hidden: int = 0  # LSTM hidden size per direction; 0: embed_dim / 4
        gate_init: float = 0.0  # residual gate start; 0 keeps the pretrained backbone unchanged at start

    def __init__(self, cfg: Config, host) -> None:
        super().__init__(cfg, host)
        bb = host.backbone
        D = bb.embed_dim
        self.where = [b % bb.depth for b in cfg.blocks]
        self.lstm = nn.ModuleList(CFBiLSTM(D, cfg.hidden or D // 4, cfg.gate_init) for _ in self.where)

    def attach(self, backbone) -> None:
        """Hook one CF-BiLSTM after each chosen block."""
        for i, blk in zip(self.where, cast(Iterable[CFBiLSTM], self.lstm)):  # a ModuleList of CFBiLSTM
            hooks = block_hooks(backbone, "cf_bilstm")
            hooks.setdefault(i, []).append(functools.partial(_grid_hook, blk, backbone.num_prefix))


def _grid_hook(blk: CFBiLSTM, prefix: int, t: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Apply ``blk`` to the patch part (B, h*w, D) of a token sequence; prefix and appended tokens pass."""
    h, w = hw
    B, _, D = t.shape
    grid = blk(t[:, prefix : prefix + h * w].reshape(B, h, w, D)).reshape(B, h * w, D)
    return torch.cat([t[:, :prefix], grid, t[:, prefix + h * w :]], 1)


def _append_hook(tok: ClassTokens, t: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    return tok.append(t)


def _gated_runner(tok: ClassTokens, j: int, blk: nn.Module, t: torch.Tensor, n_app: int) -> torch.Tensor:
    return gated_block(blk, t, n_app, tok.read_gate(j))


@MODULES.register("class_tokens")
class ClassTokenModule(PipelineModule):
    """Learnable class tokens: class scores and class-to-patch attention fused with the CAM."""

    vit_only = True
    loss_names = ("ctk_cls",)
    uses = "ViT block hooks; attention maps of the last block"

    steps: torch.Tensor  # buffer (register_buffer), declared for the type checker

    @dataclass(frozen=True)
    class Config:
        """Class token depth, loss weight and CAM fusion."""

        renamed_keys: ClassVar[dict[str, str]] = {"w_cls": "w"}

        blocks: int = 2  # the class tokens take part in the last N blocks
        w: float = 1.0  # multi-label loss on the class-token scores
        fuse: str = "product"  # geometric | product | mean | none: how class attention refines the CAM
        # iterations over which the fused CAM is blended in from the plain one, so that the pseudo-label
        # thresholds keep their meaning while the tokens learn (0: fused from the start)
        fuse_warmup: int = 0
        # how much the patches read from the class tokens (gated attention, one gate per block); 0: the
        # backbone's output starts as without the tokens, 1: plain joint attention from the start
        read_gate_init: float = 0.0

    def __init__(self, cfg: Config, host) -> None:
        super().__init__(cfg, host)
        bb = host.backbone
        if not 1 <= cfg.blocks < bb.depth:
            raise ConfigError(f"config key method.class_tokens.blocks must be in 1..{bb.depth - 1}, got {cfg.blocks}")
        if cfg.fuse not in FUSIONS:
            raise ConfigError(f"config key method.class_tokens.fuse must be one of {FUSIONS}, got '{cfg.fuse}'")
        self.tok = ClassTokens(host.classes.num_fg, bb.embed_dim, cfg.blocks, cfg.read_gate_init)
        self.prefix = bb.num_prefix
        self.last = bb.depth - 1
        self.attn_layers = (self.last,) if cfg.fuse != "none" else ()
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # optimizer steps taken (warm-in)

    def attach(self, backbone) -> None:
        """Append the class tokens after block ``depth - blocks - 1``."""
        # A partial of a module (not a lambda): deep copies of the host (FSR's EMA teacher) then call
        # their own copy of the tokens.
        first = backbone.depth - self.cfg.blocks
        block_hooks(backbone, "class_tokens").setdefault(first - 1, []).append(
            functools.partial(_append_hook, self.tok)
        )
        for j in range(self.cfg.blocks):
            if first + j in backbone.block_runners:
                raise ConfigError(f"method.class_tokens: block {first + j} already has a block runner")
            backbone.block_runners[first + j] = functools.partial(_gated_runner, self.tok, j)

    def fuse_cam(self, cam: torch.Tensor, out) -> torch.Tensor:
        """CAM (B, C, h, w) refined by the class-to-patch attention of the last block."""
        if self.cfg.fuse == "none":
            return cam
        h, w = cam.shape[-2:]
        att = ClassTokens.attention_maps(out.attn[self.last], self.prefix, h, w).to(cam.dtype)
        cam_n = cam / (cam.amax((2, 3), keepdim=True) + 1e-5)
        att_n = att / (att.amax((2, 3), keepdim=True) + 1e-5)
        if self.cfg.fuse == "geometric":
            fused = (cam_n * att_n).clamp_min(0).sqrt()
        else:
            fused = cam_n * att_n if self.cfg.fuse == "product" else 0.5 * (cam_n + att_n)
        n = self.cfg.fuse_warmup
        a = 1.0 if n <= 0 else min(1.0, float(self.steps) / n)
        return fused if a >= 1.0 else (1 - a) * cam_n + a * fused

    def on_step_end(self, it: int) -> None:
        """Count the optimizer step (the fusion's warm-in follows it, and resumes with the checkpoint)."""
        self.steps.fill_(it + 1)

    def extend(self, state: StepState) -> None:
        """Expose the final class tokens (B, C, D) as ``state.class_tokens``."""
        state.class_tokens = state.out.extra

    def losses(self, state: StepState) -> dict[str, tuple[float, torch.Tensor]]:
        """``ctk_cls``: multi-label loss of the class-token scores."""
        if self.cfg.w <= 0:
            return {}
        return {"ctk_cls": (self.cfg.w, multilabel_loss(self.tok.scores(state.out.extra), state.tags))}


@METHODS.register("cpf_cte")
class CPFCTE(ToCo):
    """CPF-CTE: the ToCo pipeline with the ``cf_bilstm`` and ``class_tokens`` modules on."""

    @dataclass(frozen=True)
    class Config(ToCo.Config):
        """ToCo's settings; ``modules`` defaults to both CPF-CTE modules."""

        modules: tuple[str, ...] = ("cf_bilstm", "class_tokens")
