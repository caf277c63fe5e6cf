"""``rca``: regional semantic contrast and aggregation (RCA, CVPR 2022) on the single-stage pipeline.

RCA's public code covers only its CAM stage (VGG-16); this is our single-stage adaptation, three
stackable modules, vectorised (no loop over images, classes or bank entries):

- ``region_memory``: one queue of ``size`` entries per class (:class:`ClassMemoryBank`; RCA: 500,
  momentum 0.99). An entry is a *region feature*: the unit mean of the final feature map over the
  tokens the auxiliary CAM labels confidently as the class (the pipeline's token labels, thresholds
  ``high_thre`` / ``low_thre``, instead of RCA's "softmaxed CAM above its own mean"), taken before
  ``region_aggregation`` so the memory never feeds on its own context. Written after the optimizer
  step for present classes whose predicted probability exceeds ``enqueue_thre`` (RCA: 0.7), gathered
  over processes; FIFO (``momentum`` 0) or momentum slots. Buffers: saved in checkpoints, resumed.
- ``region_contrast`` (semantic contrast): the step's region features and the bank go through one
  projector (the bank side without gradient: memory entries are constants as in RCA); InfoNCE at
  ``temp`` (RCA: 0.07) with all entries of the anchor's class positive and every other class's
  negative. With ``mixup`` a > 0 each anchor is mixed with another region of the batch
  (``lam ~ Beta(a, a)``, RCA: 8) and the loss is ``lam * L(class_i) + (1 - lam) * L(class_j)``.
- ``region_aggregation`` (semantic aggregation): every token attends over the bank (all entries, or
  the ``topk`` most similar per class instead of RCA's per-epoch k-means centres), and the projected
  context is added back through a per-channel gate (init ``gate_init`` 0: the pipeline starts
  unchanged) before every head, at training and at inference. With an empty bank it is a no-op.
  Attention is the cosine of a query projection of the token and a key projection of the entry at
  temperature ``temp``, the two projections starting equal, so that from the first step a token
  attends to the entries that resemble it. The bank holds unit vectors and ViT tokens have norms of
  tens: a scaled dot product of the two was uniform over the bank (entropy 0.9999 of log n on DINOv2
  features) and added one shared vector to every token. Values are read at the tokens' scale (entries
  times the batch's mean token norm) so the gate need not grow by that factor before the context counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from wsss.losses.contrast import positive_nll
from wsss.methods.pipeline import PipelineModule, StepState
from wsss.methods.regions import region_masks, region_means, tokens
from wsss.methods.toco import ToCo
from wsss.models.blocks.memory import ClassMemoryBank
from wsss.models.heads import MLPHead
from wsss.registry import METHODS, MODULES

PRE_AGGREGATION = "pre_aggregation"  # BackboneOutput.maps key of the map before memory context was added


@MODULES.register("region_memory")
class RegionMemory(PipelineModule):
    """Per-class bank of region features from confident CAM regions of earlier images."""

    loss_names = ("rca_bank_cos", "rca_bank_cos_other")  # weight-0 drift diagnostics, logged only
    uses = "a per-class bank of region features (checkpointed)"

    @dataclass(frozen=True)
    class Config:
        """Bank size and update rule."""

        size: int = 500  # entries per class
        momentum: float = 0.99  # 0: FIFO queues; m > 0: slot = normalize(m * slot + (1 - m) * new)
        enqueue_thre: float = 0.7  # write a class only when its predicted probability exceeds this

    def __init__(self, cfg: Config, host) -> None:
        super().__init__(cfg, host)
        self.bank = ClassMemoryBank(host.classes.num_fg, cfg.size, host.backbone.embed_dim, cfg.momentum)
        self.classes, self.host_cfg = host.classes, host.cfg

    def extend(self, state: StepState) -> None:
        """``state.region_feats`` (B, C, D) unit region features with gradient and ``state.region_has``
        (B, C) which exist; queues the confident, well-classified ones for the bank."""
        feat = state.out.maps.get(PRE_AGGREGATION, state.feat)
        conf, _ = region_masks(state, self.classes, self.host_cfg.high_thre, self.host_cfg.low_thre)
        emb, has = region_means(tokens(feat), conf)
        state.region_feats, state.region_has = emb, has
        if self.training:
            b, k = (has & (torch.sigmoid(state.logits.detach()) > self.cfg.enqueue_thre)).nonzero(as_tuple=True)
            self.bank.enqueue(emb[b, k], k)

    def losses(self, state: StepState) -> dict[str, tuple[float, torch.Tensor]]:
        """Weight-0 diagnostics of how far the bank has drifted from the current features: the mean cosine
        of the step's region features to the entries of their own class (``rca_bank_cos``) and of the
        other classes (``rca_bank_cos_other``). Empty while no region meets a filled class."""
        # region_has / region_feats: set by this module's extend, which runs before every losses call
        b, k = cast(torch.Tensor, state.region_has).nonzero(as_tuple=True)
        filled = self.bank.filled()
        with torch.no_grad():
            f = cast(torch.Tensor, state.region_feats)[b, k].detach().float()  # (n, D) unit
            cos = torch.einsum("nd,cmd->ncm", f, self.bank.feats)  # (n, C, M)
            own = F.one_hot(k, filled.shape[0]).bool()[:, :, None] & filled[None]  # (n, C, M)
            other = ~F.one_hot(k, filled.shape[0]).bool()[:, :, None] & filled[None]
            if not own.any():
                return {}
            out = {"rca_bank_cos": (0.0, cos[own].mean())}
            if other.any():
                out["rca_bank_cos_other"] = (0.0, cos[other].mean())
        return out

    def on_step_end(self, it: int) -> None:
        """Write the step's queued region features (all micro-batches and processes) into the bank."""
        self.bank.flush()


def mixed_memory_nce(z, labels, partner, lam, bank_z, bank_labels, temp):
    """Mixup InfoNCE against the bank: ``sum_i [lam_i L(z_i, y_i) + (1 - lam_i) L(z_i, y_partner(i))] /
    sum_i [lam_i has(y_i) + (1 - lam_i) has(y_partner(i))]``, L the mean NLL of the class's entries.

    Args:
        z: (N, E) unit anchors; labels: (N,) classes; partner: (N,) index of each anchor's mixing partner;
        lam: (N,) mixing weights; bank_z: (L, E) unit entries; bank_labels: (L,); temp: temperature.
    Returns:
        scalar loss (0 with a graph when no anchor has a positive).
    """
    log_prob = torch.log_softmax(z @ bank_z.t() / temp, 1)
    l_a, has_a = positive_nll(log_prob, labels, bank_labels)
    l_b, has_b = positive_nll(log_prob, labels[partner], bank_labels)
    w_a, w_b = lam * has_a, (1 - lam) * has_b
    norm = (w_a + w_b).sum()
    if float(norm) <= 0:
        return z.sum() * 0.0
    return (w_a * l_a + w_b * l_b).sum() / norm


@MODULES.register("region_contrast")
class RegionContrast(PipelineModule):
    """Semantic contrast of the step's region features against the region memory."""

    loss_names = ("rca_sc",)
    warmup_key = "warmup"
    uses = "the region bank"

    needs = ("region_memory",)

    @dataclass(frozen=True)
    class Config:
        """Loss weight, temperature, projector width, mixup concentration."""

        w: float = 0.01  # RCA's weight in its training loss
        temp: float = 0.07
        dim: int = 128
        mixup: float = 8.0  # Beta(a, a) concentration of the region mixup; 0: off
        min_entries: int = 1  # a class's entries take part once it holds this many
        warmup: int = 0  # iterations before the loss starts (the bank fills from the start; RCA: 2 of 30 epochs)

    def __init__(self, cfg: Config, host) -> None:
        super().__init__(cfg, host)
        self.proj = MLPHead(host.backbone.embed_dim, cfg.dim)

    def losses(self, state: StepState) -> dict[str, tuple[float, torch.Tensor]]:
        """``rca_sc``: (mixup) InfoNCE of the region features against the bank."""
        c = self.cfg
        if c.w <= 0 or state.it < c.warmup:
            return {}
        # region_has / region_feats: set by region_memory's extend (a needed module, so it runs before this)
        b, k = cast(torch.Tensor, state.region_has).nonzero(as_tuple=True)
        f = cast(torch.Tensor, state.region_feats)[b, k]  # (n, D)
        bank, bank_labels = cast(RegionMemory, self.deps["region_memory"]).bank.entries(c.min_entries)
        n = f.shape[0]
        partner, lam = torch.arange(n, device=f.device), torch.ones(n, device=f.device)
        if c.mixup > 0 and n > 1:
            partner = torch.randperm(n, generator=state.gen, device=f.device)
            seed = int(torch.randint(2**31, (1,), generator=state.gen, device=f.device))
            lam = torch.from_numpy(np.random.default_rng(seed).beta(c.mixup, c.mixup, n)).to(f)
            f = lam[:, None] * f + (1 - lam[:, None]) * f[partner]
        z = self.proj(f)
        with torch.no_grad():
            bank_z = self.proj(bank.to(z.dtype))
        return {"rca_sc": (c.w, mixed_memory_nce(z, k, partner, lam, bank_z, bank_labels, c.temp))}


@MODULES.register("region_aggregation")
class RegionAggregation(PipelineModule):
    """Tokens attend over the region memory; the context is added back through a zero-initialised gate."""

    uses = "the region bank, at training and inference"

    needs = ("region_memory",)

    @dataclass(frozen=True)
    class Config:
        """Attention width and temperature, top-k per class, gate start."""

        dim: int = 128  # query / key width
        temp: float = 0.1  # of the query-key cosine
        cosine: bool = True  # False: the scaled dot product of the raw projections (inert on unit entries)
        topk: int = 0  # attend over the k most similar entries of each class; 0: all entries
        min_entries: int = 1  # a class's entries take part once it holds this many
        gate_init: float = 0.0

    def __init__(self, cfg: Config, host) -> None:
        super().__init__(cfg, host)
        D = host.backbone.embed_dim
        # no bias: a shared offset would pull every cosine towards 1 and make it depend on the token's norm
        self.q, self.k = nn.Linear(D, cfg.dim, bias=False), nn.Linear(D, cfg.dim, bias=False)
        self.k.load_state_dict(self.q.state_dict())  # attention starts as the similarity of the features
        self.v, self.o = nn.Linear(D, D), nn.Linear(D, D)
        self.gate = nn.Parameter(torch.full((D,), float(cfg.gate_init)))

    def scores(self, x: torch.Tensor, bank: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
        """Attention logits (B, N, C*M) of tokens x (B, N, D) over bank (C, M, D); -inf where not ``filled``
        (C, M) or outside a class's top k."""
        C, M, D = bank.shape
        q, k = self.q(x), self.k(bank.reshape(C * M, D))
        if self.cfg.cosine:
            sim = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).t() / self.cfg.temp
        else:
            sim = q @ k.t() / math.sqrt(self.cfg.dim)
        sim = sim.masked_fill(~filled.flatten(), float("-inf"))
        k = self.cfg.topk
        if 0 < k < M:
            per_class = sim.unflatten(-1, (C, M))
            kth = per_class.topk(k, dim=-1).values[..., -1:]  # classes with < k entries: -inf, all kept
            sim = per_class.masked_fill(per_class < kth, float("-inf")).flatten(-2)
        return sim

    def context(self, x: torch.Tensor, bank: torch.Tensor, filled: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """Memory context (B, N, D) for tokens x (B, N, D) from bank (C, M, D) where ``filled`` (C, M); the
        entries enter the values multiplied by ``scale``."""
        C, M, D = bank.shape
        return self.scores(x, bank, filled).softmax(-1) @ self.v(scale * bank.reshape(C * M, D))

    def refine_features(self, out) -> None:
        """feat <- feat + gate * o(attention over the bank); unchanged while the bank is empty."""
        bank = cast(RegionMemory, self.deps["region_memory"]).bank
        filled = bank.filled(self.cfg.min_entries)
        if not bool(filled.any()):
            return
        feat = out.feat
        out.maps[PRE_AGGREGATION] = feat
        x = tokens(feat)
        scale = x.detach().norm(dim=-1).mean() if self.cfg.cosine else 1.0
        ctx = self.o(self.context(x, bank.feats.to(x.dtype), filled, scale))
        y = x + self.gate.to(x.dtype) * ctx
        out.feat = y.transpose(1, 2).reshape(feat.shape)


@METHODS.register("rca")
class RCA(ToCo):
    """RCA: the ToCo pipeline with the region memory, semantic contrast and semantic aggregation on."""

    @dataclass(frozen=True)
    class Config(ToCo.Config):
        """ToCo's settings; ``modules`` defaults to the three RCA modules."""

        modules: tuple[str, ...] = ("region_memory", "region_contrast", "region_aggregation")
