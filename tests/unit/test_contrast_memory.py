"""STCL building blocks on hand-checkable inputs: SupCon, adaptive memory contrast, the class memory bank."""

import math
from types import SimpleNamespace

import pytest
import torch

from wsss.data.classes import ClassSpec
from wsss.losses.contrast import memory_contrast, supcon_loss
from wsss.methods.pipeline import StepState
from wsss.methods.stcl import SpatialContrast, TemporalContrast
from wsss.models.blocks.memory import ClassMemoryBank


def test_supcon_on_three_tokens():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    # anchors 0 and 2 are each other's only positive; anchor 1 has none and is left out:
    # L = -(1 - log(e^0 + e^1)) for both
    assert supcon_loss(z, torch.tensor([0, 1, 0]), temp=1.0).item() == pytest.approx(math.log(1 + math.e) - 1, rel=1e-6)
    # temperature 0.5 doubles the logits
    assert supcon_loss(z, torch.tensor([0, 1, 0]), temp=0.5).item() == pytest.approx(
        math.log(1 + math.e**2) - 2, rel=1e-6
    )
    assert supcon_loss(z, torch.tensor([0, 1, 2])).item() == 0.0  # no anchor has a positive


def test_memory_contrast_hand_computed_and_adaptive_weight():
    a = torch.tensor([[1.0, 0.0]], requires_grad=True)
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    lse = math.log(math.e + 1 + math.exp(0.6))
    plain = lse - 0.8  # -1/2 [(1 - lse) + (0.6 - lse)] over the two class-0 entries
    loss, w = memory_contrast(a, torch.tensor([0]), bank, torch.tensor([0, 1, 0]), temp=1.0, gamma=0.0)
    assert loss.item() == pytest.approx(plain, rel=1e-6) and w.tolist() == [1.0]
    loss, w = memory_contrast(a, torch.tensor([0]), bank, torch.tensor([0, 1, 0]), temp=1.0, gamma=2.0)
    assert w.item() == pytest.approx(0.2**2) and loss.item() == pytest.approx(0.04 * plain, rel=1e-5)
    loss.backward()
    assert a.grad.abs().sum() > 0
    # an anchor whose class has no entry is left out; with none left the loss is 0
    loss, w = memory_contrast(a, torch.tensor([2]), bank, torch.tensor([0, 1, 0]))
    assert loss.item() == 0.0 and w.tolist() == [0.0]


def _e(*v):
    return torch.nn.functional.normalize(torch.tensor([list(v)], dtype=torch.float32), dim=-1)


def test_memory_bank_fifo_evicts_the_oldest():
    bank = ClassMemoryBank(num_classes=2, size=3, dim=2)
    e = [_e(1, i) for i in range(5)]
    one = torch.tensor([1])
    bank.push(torch.cat(e[:2]), torch.tensor([1, 1]))
    assert bank.count.tolist() == [0, 2] and bank.ptr.tolist() == [0, 2]
    bank.push(torch.cat(e[2:4]), torch.tensor([1, 1]))  # fills slot 2, then overwrites slot 0 (e0, the oldest)
    assert torch.allclose(bank.feats[1], torch.cat([e[3], e[1], e[2]]))
    bank.push(e[4], one)  # evicts e1, now the oldest
    assert torch.allclose(bank.feats[1], torch.cat([e[3], e[4], e[2]]))
    assert bank.count.tolist() == [0, 3] and bank.ptr.tolist() == [0, 2]
    feats, labels = bank.entries()
    assert labels.tolist() == [1, 1, 1] and bank.entries(min_count=4)[0].shape == (0, 2)
    # more new entries than slots: only the newest survive
    bank.push(torch.cat([_e(0, 1)] * 2 + [_e(1, 1)] * 3), torch.tensor([0, 0, 0, 0, 0]))
    assert bank.count.tolist() == [3, 3] and torch.allclose(bank.feats[0], _e(1, 1).expand(3, 2))


def test_memory_bank_momentum_update_and_state_dict_round_trip():
    bank = ClassMemoryBank(num_classes=1, size=2, dim=2, momentum=0.5)
    z = torch.tensor([0])
    bank.push(_e(1, 0), z)
    bank.push(_e(0, 1), z)  # slot 1 was empty: written as is
    bank.push(_e(0, 1), z)  # slot 0 filled: normalize(0.5 (1, 0) + 0.5 (0, 1))
    assert torch.allclose(bank.feats[0], torch.tensor([[0.5**0.5, 0.5**0.5], [0.0, 1.0]]))
    other = ClassMemoryBank(num_classes=1, size=2, dim=2, momentum=0.5)
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.feats, bank.feats) and other.ptr.tolist() == [1] and other.count.tolist() == [2]


def _temporal(enqueue_thre=0.7, uncertain_anchors=True):
    host = SimpleNamespace(backbone=SimpleNamespace(embed_dim=4), classes=ClassSpec(("a", "b")),
                           cfg=SimpleNamespace(high_thre=0.7, low_thre=0.25))  # fmt: skip
    torch.manual_seed(0)
    cfg = TemporalContrast.Config(size=4, dim=3, enqueue_thre=enqueue_thre, min_entries=1,
                                  uncertain_anchors=uncertain_anchors)  # fmt: skip
    return TemporalContrast(cfg, host)


def _state(logits):
    feat = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    tok = torch.tensor([[[1, 1], [255, 0]]])  # two tokens confidently class "a" (label 1), one uncertain, one bg
    aux = torch.zeros(1, 2, 2, 2)
    aux[0, 0] = torch.tensor([[0.9, 0.8], [0.5, 0.1]])
    return StepState(x=None, tags=torch.tensor([[1.0, 1.0]]), valid=torch.ones(1, 2, 2, dtype=torch.bool), out=None,
                     feat=feat, logits=torch.tensor([logits]), cam=aux, aux_cam=aux, tok_labels=tok,
                     tok_valid=torch.ones(1, 2, 2, dtype=torch.bool), it=0)  # fmt: skip


def test_temporal_bank_takes_only_confident_regions_of_confident_classes():
    mod = _temporal()
    st = _state([3.0, 3.0])  # both classes predicted with p = 0.95, but only "a" has confident tokens
    out = mod.losses(st)
    assert out["mem"][1].item() == 0.0  # empty bank: nothing to contrast yet
    mod.on_step_end(0)
    assert mod.bank.count.tolist() == [1, 0]
    z = mod.proj(st.feat.flatten(2).transpose(1, 2))[0]  # (4 tokens, 3)
    expect = torch.nn.functional.normalize(z[:2].mean(0), dim=0)  # mean over the two confident tokens
    assert torch.allclose(mod.bank.feats[0, 0], expect, atol=1e-6)
    # a low class probability blocks the write even for confident tokens
    mod2 = _temporal()
    mod2.losses(_state([0.0, 3.0]))
    mod2.on_step_end(0)
    assert mod2.bank.count.tolist() == [0, 0]
    # with a class-"b" entry as a negative, the uncertain region of "a" gives a loss and a gradient; the
    # confident region equals its memory entry exactly, so its adaptive weight (1 - cos)^2 is 0
    mod.bank.push(_e(0, 0, 1), torch.tensor([1]))
    out = mod.losses(_state([3.0, 3.0]))
    loss = out["mem"][1]
    assert loss.item() > 0
    loss.backward()
    assert mod.proj.net[0].weight.grad.abs().sum() > 0
    # Without the band anchors the one anchor left is the confident region, at weight 0.
    off = _temporal(uncertain_anchors=False)
    off.losses(_state([3.0, 3.0]))
    off.on_step_end(0)
    off.bank.push(_e(0, 0, 1), torch.tensor([1]))
    assert abs(off.losses(_state([3.0, 3.0]))["mem"][1].item()) < 1e-9


def test_bench_stcl_leaves_the_band_anchors_out_and_the_paper_recipes_keep_them():
    from wsss.config import load_config

    assert load_config("configs/bench/stcl.yaml").method.temporal_contrast.uncertain_anchors is False
    assert load_config("configs/stcl/voc_vit-b.yaml").method.temporal_contrast.uncertain_anchors is True


def _spatial(**kw):
    host = SimpleNamespace(backbone=SimpleNamespace(embed_dim=4), classes=ClassSpec(("a", "b")))
    torch.manual_seed(0)
    return SpatialContrast(SpatialContrast.Config(dim=3, temp=0.5, **kw), host)


def test_spatial_patch_contrast_takes_the_confident_tokens_with_their_labels():
    mod = _spatial(w_class=0.0)
    st = _state([3.0, 3.0])  # token labels [[1, 1], [255, 0]]: tokens 0, 1 class "a", token 3 background
    tok = st.feat.flatten(2)[0].t()  # (4 tokens, 4 channels)
    got = mod.losses(st)["sc_patch"][1]
    assert got.item() == pytest.approx(supcon_loss(mod.proj(tok[[0, 1, 3]]), torch.tensor([1, 1, 0]), 0.5).item())
    st.feat = st.feat.clone()
    st.feat[0, :, 1, 0] = 10.0  # the uncertain token (label 255) takes no part
    assert mod.losses(st)["sc_patch"][1].item() == pytest.approx(got.item())
    st.feat[0, :, 0, 1], st.feat[0, :, 1, 1] = tok[3], tok[1]  # a class-"a" token and the background swapped
    assert abs(mod.losses(st)["sc_patch"][1].item() - got.item()) > 1e-4
    # a budget of 2 tokens: the loss of one 2-subset of the three confident tokens
    mod2 = _spatial(w_class=0.0, max_tokens=2)
    st = _state([3.0, 3.0])
    st.gen = torch.Generator().manual_seed(0)
    sub = mod2.losses(st)["sc_patch"][1].item()
    cands = [supcon_loss(mod2.proj(tok[list(i)]), torch.tensor(lab), 0.5).item()
             for i, lab in (((0, 1), [1, 1]), ((0, 3), [1, 0]), ((1, 3), [1, 0]))]  # fmt: skip
    assert any(sub == pytest.approx(c) for c in cands), (sub, cands)


def test_spatial_class_embeddings_are_cam_weighted_means_or_the_class_tokens():
    mod = _spatial()
    st = _state([3.0, 3.0])
    emb = mod.class_embeddings(st)  # (1, 2, 4)
    tok = st.feat.flatten(2)[0].t()
    wa = torch.tensor([0.9, 0.8, 0.5, 0.1]) / 2.3  # class "a"'s CAM on the 4 tokens, summing to 1
    assert torch.allclose(emb[0, 0], wa @ tok, atol=1e-6)
    assert torch.allclose(emb[0, 1], torch.zeros(4))  # class "b" has no CAM anywhere
    st.class_tokens = torch.ones(1, 2, 4)
    assert torch.equal(mod.class_embeddings(st), torch.ones(1, 2, 4))


def test_spatial_class_contrast_acts_without_a_repeated_class_in_the_batch():
    # one image with classes "a" and "b": the in-batch SupCon had no positive pair here and was 0
    mod = _spatial(w_patch=0.0)
    st = _state([3.0, 3.0])
    st.cam = st.cam.clone()
    st.cam[0, 1] = torch.tensor([[0.0, 0.1], [0.2, 0.9]])
    first = mod.losses(st)["sc_class"][1]
    assert first.item() == 0.0  # the queue is empty at the first step
    mod.on_step_end(0)
    assert mod.bank.count.tolist() == [1, 1]
    loss = mod.losses(st)["sc_class"][1]
    z = mod.proj(mod.class_embeddings(st)[0])  # (2, 3): the same embeddings the queue holds
    s = z @ z.t().detach() / 0.5
    expect = -(torch.log_softmax(s, 1).diagonal()).mean()  # each anchor: its own class's one entry positive
    assert loss.item() == pytest.approx(expect.item(), abs=1e-5) and loss.item() > 0.01
    loss.backward()
    assert mod.proj.net[0].weight.grad.abs().sum() > 0
