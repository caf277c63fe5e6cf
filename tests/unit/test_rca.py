"""RCA mechanisms: region memory writes, mixup memory contrast, memory aggregation, modules off == baseline."""

import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import TINY, WEIGHTS
from tests.methods.test_methods import SPEC, _batch
from wsss.build import build_method
from wsss.config import ConfigError, load_config
from wsss.data.classes import ClassSpec
from wsss.methods.pipeline import StepState
from wsss.methods.rca import PRE_AGGREGATION, RegionAggregation, RegionContrast, RegionMemory, mixed_memory_nce
from wsss.models.backbone import BackboneOutput

W = os.environ.get("WSSS_WEIGHTS") or WEIGHTS
A, B_ = math.log1p(math.exp(-1)), math.log1p(math.e)  # -log softmax([1, 0])[0] and [1]


def test_memory_nce_hand_computed_with_and_without_mixup():
    bank, bl = torch.eye(2), torch.tensor([0, 1])
    z, lab = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    one = mixed_memory_nce(z, lab, torch.tensor([0]), torch.ones(1), bank, bl, temp=1.0)
    assert one.item() == pytest.approx(A, abs=1e-6)
    # two anchors mixed with each other: lam 0.75 and 0.5
    z, lab, partner, lam = torch.eye(2), torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([0.75, 0.5])
    got = mixed_memory_nce(z, lab, partner, lam, bank, bl, temp=1.0)
    assert got.item() == pytest.approx(((0.75 * A + 0.25 * B_) + (0.5 * A + 0.5 * B_)) / 2, abs=1e-6)
    # class 1 absent from the bank: only the class-0 parts count, normalised by their weights
    got = mixed_memory_nce(z, lab, partner, lam, bank[:1], bl[:1], temp=1.0)
    assert got.item() == pytest.approx((0.75 * 0.0 + 0.5 * 0.0) / 1.25, abs=1e-6)  # one entry: log-prob 0
    assert mixed_memory_nce(z, lab, partner, lam, bank[:0], bl[:0], temp=1.0).item() == 0.0


def _host(D=4, high=0.7):
    return SimpleNamespace(backbone=SimpleNamespace(embed_dim=D), classes=ClassSpec(("a", "b")),
                           cfg=SimpleNamespace(high_thre=high, low_thre=0.25))  # fmt: skip


def _state(logits, pre=None):
    feat = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(1), requires_grad=True)
    tok = torch.tensor([[[1, 1], [255, 2]]])  # tokens 0, 1: class "a" (label 1); token 3: class "b"
    aux = torch.zeros(1, 2, 2, 2)
    out = BackboneOutput(feat, {}, None, {}, maps={} if pre is None else {PRE_AGGREGATION: pre})
    return StepState(x=None, tags=torch.tensor([[1.0, 1.0]]), valid=None, out=out, feat=feat,
                     logits=torch.tensor([logits]), cam=aux, aux_cam=aux, tok_labels=tok,
                     tok_valid=torch.ones(1, 2, 2, dtype=torch.bool), it=0,
                     gen=torch.Generator().manual_seed(0))  # fmt: skip


def test_region_memory_writes_confident_regions_of_confident_classes_from_the_pre_aggregation_map():
    mem = RegionMemory(RegionMemory.Config(size=3, momentum=0.0, enqueue_thre=0.7), _host())
    pre = torch.arange(16.0).view(1, 4, 2, 2)
    st = _state([3.0, -3.0], pre=pre)  # "a" predicted (p 0.95), "b" not (p 0.05)
    mem.extend(st)
    assert st.region_has.tolist() == [[True, True]]
    assert mem.bank.count.tolist() == [0, 0]  # nothing is written before the step ends
    mem.on_step_end(0)
    assert mem.bank.count.tolist() == [1, 0]
    tok = pre.flatten(2)[0].t()  # (4 tokens, 4 channels)
    assert torch.allclose(mem.bank.feats[0, 0], F.normalize(tok[:2].mean(0), dim=0))
    # two micro-batches before one step end: both are written, in order; FIFO evicts the oldest
    for _ in range(2):
        mem.extend(_state([3.0, -3.0], pre=pre))
        mem.extend(_state([3.0, -3.0], pre=2 * pre))
        mem.on_step_end(0)
    assert mem.bank.count.tolist() == [3, 0] and mem.bank.ptr.tolist() == [2, 0]
    assert torch.allclose(mem.bank.feats[0, 1], F.normalize(2 * tok[:2].mean(0), dim=0))
    # eval mode: features are computed, nothing is queued
    mem.eval()
    mem.extend(_state([3.0, 3.0]))
    mem.on_step_end(0)
    assert mem.bank.count.tolist() == [3, 0]


def test_region_contrast_uses_the_bank_without_gradient_and_reaches_the_features():
    torch.manual_seed(0)
    host = _host()
    mem = RegionMemory(RegionMemory.Config(size=4, momentum=0.0), host)
    con = RegionContrast(RegionContrast.Config(w=0.1, temp=0.5, dim=3, mixup=0.0), host)
    con.deps = {"region_memory": mem}
    mem.bank.push(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]), torch.tensor([0, 1]))
    st = _state([3.0, 3.0])
    mem.extend(st)
    w, loss = con.losses(st)["rca_sc"]
    f = st.region_feats[0]  # both classes present
    expect = mixed_memory_nce(con.proj(f), torch.tensor([0, 1]), torch.arange(2), torch.ones(2),
                              con.proj(mem.bank.feats[:, 0]), torch.tensor([0, 1]), 0.5)  # fmt: skip
    assert w == 0.1 and loss.item() == pytest.approx(expect.item(), abs=1e-6)
    loss.backward()
    assert st.feat.grad.abs().sum() > 0 and con.proj.net[0].weight.grad.abs().sum() > 0


class _Unit(torch.nn.Module):
    def forward(self, x):
        return F.normalize(x, dim=-1)


def test_region_mixup_mixes_two_regions_and_their_targets_by_hand():
    """Beta(a, a) with a huge a draws lam = 0.5: both anchors become the mean of the two regions, and each
    is scored half against its own class's entry and half against its partner's."""
    host = _host()
    mem = RegionMemory(RegionMemory.Config(size=4, momentum=0.0), host)
    con = RegionContrast(RegionContrast.Config(w=1.0, temp=0.5, dim=4, mixup=1e7), host)
    con.deps, con.proj = {"region_memory": mem}, _Unit()  # identity projector: the loss can be done by hand
    e = torch.eye(4)
    mem.bank.push(e[:2], torch.tensor([0, 1]))
    st = _state([3.0, 3.0])
    for seed in range(100):  # a draw where the two regions are each other's partner
        if torch.randperm(2, generator=torch.Generator().manual_seed(seed)).tolist() == [1, 0]:
            break
    st.gen = torch.Generator().manual_seed(seed)
    mem.extend(st)
    got = con.losses(st)["rca_sc"][1]
    f = st.region_feats[0].detach()  # (2 classes, D)
    z = F.normalize((f[0] + f[1]) / 2, dim=0)
    logit = torch.stack([z[0], z[1]]) / 0.5  # cosine to the unit entries e0, e1
    nll = torch.logsumexp(logit, 0) - logit
    assert got.item() == pytest.approx((0.5 * nll[0] + 0.5 * nll[1]).item(), abs=1e-4)
    # without mixup each anchor is its own region, scored on its own class only: another value
    con0 = RegionContrast(RegionContrast.Config(w=1.0, temp=0.5, dim=4, mixup=0.0), host)
    con0.deps, con0.proj = {"region_memory": mem}, _Unit()
    zs = F.normalize(f, dim=1)
    own = torch.logsumexp(zs[:, :2] / 0.5, 1) - zs[[0, 1], [0, 1]] / 0.5
    assert con0.losses(st)["rca_sc"][1].item() == pytest.approx(own.mean().item(), abs=1e-5)
    assert abs(own.mean().item() - got.item()) > 1e-3


def _agg(topk=0, gate=1.0, **kw):
    host = _host(D=2)
    mem = RegionMemory(RegionMemory.Config(size=2, momentum=0.0), host)
    agg = RegionAggregation(RegionAggregation.Config(dim=2, topk=topk, gate_init=gate, **kw), host)
    agg.deps = {"region_memory": mem}
    with torch.no_grad():
        for lin in (agg.q, agg.k, agg.v, agg.o):
            lin.weight.copy_(torch.eye(2))
        for lin in (agg.v, agg.o):
            lin.bias.zero_()
    return agg, mem


def test_aggregation_hand_computed_cosine_topk_and_noop_when_empty():
    agg, mem = _agg(temp=0.5)
    x = torch.tensor([[[[2.0]], [[0.0]]]])  # one token (2, 0): (B=1, D=2, 1, 1)
    out = BackboneOutput(x, {}, None, {})
    agg.refine_features(out)
    assert out.feat is x and PRE_AGGREGATION not in out.maps  # empty bank: untouched
    mem.bank.push(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
    agg.refine_features(out)
    p = torch.softmax(torch.tensor([1.0, 0.0]) / 0.5, 0)  # cosines 1 and 0 at temperature 0.5
    # values at the token's scale: the entries times the mean token norm 2
    assert torch.allclose(out.feat.flatten(), torch.tensor([2.0, 0.0]) + 2 * p, atol=1e-6)
    assert out.maps[PRE_AGGREGATION] is x
    # the token's norm does not change its attention (it did with the scaled dot product)
    assert torch.allclose(agg.scores(10 * x.flatten(2).transpose(1, 2), mem.bank.feats, mem.bank.filled()),
                          agg.scores(x.flatten(2).transpose(1, 2), mem.bank.feats, mem.bank.filled()))  # fmt: skip
    # top-1 per class: class 0's second entry (0.6, 0.8) scores below its first and is left out
    agg1, mem1 = _agg(topk=1, temp=0.5)
    mem1.bank.push(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), torch.tensor([0, 0, 1]))
    ctx = agg1.context(x.flatten(2).transpose(1, 2), mem1.bank.feats, mem1.bank.filled())
    assert torch.allclose(ctx.flatten(), p, atol=1e-6)
    ctx_all = _agg(topk=0, temp=0.5)[0].context(x.flatten(2).transpose(1, 2), mem1.bank.feats, mem1.bank.filled())
    s = torch.softmax(torch.tensor([1.0, 0.6, 0.0]) / 0.5, 0)
    assert torch.allclose(ctx_all.flatten(), s[0] * torch.tensor([1.0, 0]) + s[1] * torch.tensor([0.6, 0.8])
                          + s[2] * torch.tensor([0.0, 1.0]), atol=1e-6)  # fmt: skip


def test_aggregation_scaled_dot_product_variant_hand_computed():
    agg, mem = _agg(cosine=False)
    x = torch.tensor([[[[2.0]], [[0.0]]]])
    mem.bank.push(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
    out = BackboneOutput(x, {}, None, {})
    agg.refine_features(out)
    p = torch.softmax(torch.tensor([2 / math.sqrt(2), 0.0]), 0)  # q.k / sqrt(dim), values unscaled
    assert torch.allclose(out.feat.flatten(), torch.tensor([2.0, 0.0]) + p, atol=1e-6)


def _separable(C=6, M=4, D=32, norm=40.0, seed=0):
    """A bank of C classes x M entries clustered around C orthogonal directions, and 3 tokens per class of
    norm ``norm`` near the same directions: (bank (C, M, D), tokens (1, 3C, D), token classes (3C,))."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.linalg.qr(torch.randn(D, C, generator=g))[0].t()  # (C, D) orthonormal
    bank = F.normalize(dirs[:, None] + 0.3 * torch.randn(C, M, D, generator=g) / math.sqrt(D), dim=-1)
    lab = torch.arange(C).repeat_interleave(3)
    tok = norm * F.normalize(dirs[lab] + 0.3 * torch.randn(3 * C, D, generator=g) / math.sqrt(D), dim=-1)
    return bank, tok[None], lab


def _attention_stats(agg, bank, tok, lab):
    C, M, _ = bank.shape
    with torch.no_grad():
        p = agg.scores(tok, bank, torch.ones(C, M, dtype=torch.bool)).softmax(-1)[0]  # (T, C*M)
    own = p.unflatten(-1, (C, M)).sum(-1).gather(1, lab[:, None])[:, 0]
    ent = -(p * p.clamp_min(1e-12).log()).sum(-1) / math.log(C * M)
    return own.mean().item(), ent.mean().item()


def test_aggregation_attends_to_its_own_class_from_initialisation():
    # tokens at ViT scale (norm 40) against unit entries: the cosine attention puts its mass on the
    # token's class and is far from uniform; the scaled dot product of the same projections is not
    bank, tok, lab = _separable()
    host = _host(D=32)
    torch.manual_seed(0)
    own, ent = _attention_stats(RegionAggregation(RegionAggregation.Config(dim=16), host), bank, tok, lab)
    assert own > 0.95 and ent < 0.5, (own, ent)  # uniform over the class's 4 of 24 entries: 0.44
    torch.manual_seed(0)
    own_dot, ent_dot = _attention_stats(RegionAggregation(RegionAggregation.Config(dim=16, cosine=False), host),
                                        bank, tok, lab)  # fmt: skip
    assert ent_dot > 0.9 and own_dot < 0.5, (own_dot, ent_dot)
    # an entry's own token scores exactly 1 / temp: query and key projections start equal
    agg = RegionAggregation(RegionAggregation.Config(dim=16, temp=0.1), host)
    s = agg.scores(bank[:1, :1] * 40, bank, torch.ones(6, 4, dtype=torch.bool))
    assert s[0, 0, 0].item() == pytest.approx(10.0, abs=1e-4) and s.max().item() == pytest.approx(10.0, abs=1e-4)


@pytest.mark.skipif(not Path(W).is_file(), reason="no local pretrained weights")
def test_aggregation_on_dinov2_features_is_token_specific():
    # DINOv2 ViT-S/14 tokens of demo images (norm about 44) against a bank of their unit region means:
    # measured entropy / log n 0.72 (cosine) and 0.999 (scaled dot product); the context's spread over
    # tokens, relative to its norm, 0.26 and 0.015. The attention is not class-specific on these untrained
    # features (own-class mass 0.19 against a chance share of 0.18): the demo classes differ in shape, not colour
    from wsss.data.synthetic import DemoConfig, make_sample
    from wsss.models.backbone import ViTBackbone

    torch.manual_seed(0)
    bb = ViTBackbone("vit_small_patch14_dinov2", W, img_size=112).eval()
    rng, dcfg = np.random.default_rng(0), DemoConfig(size=112)
    imgs, masks = zip(*[make_sample(rng, dcfg) for _ in range(24)])
    x = torch.tensor(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        tok = bb(x).feat.flatten(2).transpose(1, 2)  # (24, 64, 384)
    lab = F.interpolate(torch.tensor(np.stack(masks))[:, None].float(), size=(8, 8), mode="nearest").long().flatten(1)
    C, D = 5, tok.shape[-1]
    ent = [[F.normalize(tok[b, lab[b] == c].mean(0), dim=0) for b in range(16) if (lab[b] == c).any()]
           for c in range(1, C + 1)]  # fmt: skip
    M = max(len(e) for e in ent)
    bank, filled = torch.zeros(C, M, D), torch.zeros(C, M, dtype=torch.bool)
    for c, e in enumerate(ent):
        bank[c, : len(e)], filled[c, : len(e)] = torch.stack(e), True
    q, fg = tok[16:], (lab[16:] > 0) & (lab[16:] < 255)
    stats = []
    for cosine in (True, False):
        torch.manual_seed(1)
        agg = RegionAggregation(RegionAggregation.Config(dim=64, cosine=cosine), _host(D=D))
        with torch.no_grad():
            p = agg.scores(q, bank, filled).softmax(-1)
            ctx = agg.context(q, bank, filled)
        h = (-(p * p.clamp_min(1e-12).log()).sum(-1) / math.log(int(filled.sum())))[fg].mean().item()
        spread = ((ctx - ctx.mean((0, 1))).norm(dim=-1).mean() / ctx.norm(dim=-1).mean()).item()
        stats.append((h, spread))
    (h_cos, s_cos), (h_dot, s_dot) = stats
    assert h_cos < 0.9 and s_cos > 0.1, stats
    assert h_dot > 0.99 and s_dot < 0.05, stats


def test_region_memory_reports_the_banks_drift_from_the_current_features():
    mem = RegionMemory(RegionMemory.Config(size=2, momentum=0.0), _host())
    st = _state([3.0, 3.0])
    st.region_feats = torch.tensor([[[0.6, 0.8, 0, 0], [0.6, 0, 0, 0.8]]])  # (B=1, C=2, D=4)
    st.region_has = torch.tensor([[True, True]])
    assert mem.losses(st) == {}  # empty bank: nothing to compare with
    mem.bank.push(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]]), torch.tensor([0, 0, 1]))
    logs = mem.losses(st)
    assert logs["rca_bank_cos"][0] == 0.0 and logs["rca_bank_cos_other"][0] == 0.0  # logged, not trained
    assert logs["rca_bank_cos"][1].item() == pytest.approx((0.6 + 0.8 + 0.0) / 3)  # own-class entries
    assert logs["rca_bank_cos_other"][1].item() == pytest.approx((0.0 + 0.6 + 0.0) / 3)  # the others


def test_aggregation_gate_zero_is_identity_and_the_gate_gets_gradient():
    agg, mem = _agg(gate=0.0)
    mem.bank.push(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
    x = torch.randn(1, 2, 3, 3)
    out = BackboneOutput(x, {}, None, {})
    agg.refine_features(out)
    assert torch.equal(out.feat, x)
    out.feat.pow(2).sum().backward()
    assert agg.gate.grad.abs().sum() > 0


def _build(*over):
    torch.manual_seed(0)
    return build_method(load_config(None, [*TINY, "--method.seg_warmup", "1", *over]), SPEC)


def test_rca_modules_off_and_closed_gate_are_exactly_the_baseline():
    base = _build()
    off = _build("--method.name", "rca", "--method.modules", "[]")
    sa, sb = base.state_dict(), off.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert base.train_step(_batch(), 1).loss.item() == off.train_step(_batch(), 1).loss.item()
    full = _build("--method.name", "rca")
    full.load_state_dict(base.state_dict(), strict=False)
    full.mods["region_memory"].bank.push(torch.randn(3, base.backbone.embed_dim), torch.tensor([0, 1, 2]))
    x = _batch()["image"]
    base.eval(), full.eval()
    assert torch.equal(base.predict_seg(x), full.predict_seg(x))  # gate 0: memory context not yet let in
    with torch.no_grad():
        full.mods["region_aggregation"].gate.fill_(1.0)
    assert not torch.equal(base.predict_seg(x), full.predict_seg(x))  # open: inference uses the bank


def test_rca_step_fills_the_bank_and_logs_the_contrast():
    m = _build("--method.name", "rca", "--method.region_memory.enqueue_thre", "0")
    out = m.train_step(_batch(), 1)
    assert "rca_sc" in out.logs
    out.loss.backward()
    m.on_step_end(1)
    assert int(m.mods["region_memory"].bank.count.sum()) > 0
    out = m.train_step(_batch(), 2)  # the aggregation now runs on a non-empty bank, inside the step
    assert -1.0 <= float(out.logs["rca_bank_cos"]) <= 1.0  # the drift diagnostic once the bank holds entries
    out.loss.backward()
    assert m.mods["region_aggregation"].gate.grad.abs().sum() > 0


def test_needs_are_checked_at_config_time():
    with pytest.raises(ConfigError, match="region_contrast needs the region_memory module, listed too"):
        load_config(None, ["--method.modules", "[region_contrast]"])
    with pytest.raises(ConfigError, match="listed before it"):
        load_config(None, ["--method.modules", "[region_aggregation, region_memory]"])
