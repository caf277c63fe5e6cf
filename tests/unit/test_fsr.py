"""FSR mechanisms: uncertainty masks, view geometry, exact EMA teacher, distillation, confident-only consistency."""

import pytest
import torch

from tests.conftest import TINY
from tests.methods.test_methods import SPEC, _batch
from wsss.build import build_method
from wsss.config import ConfigError, load_config
from wsss.data.views import View, random_resized_view
from wsss.losses.distill import CenteredDistill
from wsss.methods.fsr import uncertainty_block_mask
from wsss.methods.pipeline import StepState

SMALL = ["--method.ema_teacher.out_dim", "64", "--method.ema_teacher.hidden", "32",
         "--method.ema_teacher.bottleneck", "16", "--method.uncertain_masking.block", "1"]  # fmt: skip


def test_mask_covers_exactly_the_uncertain_blocks():
    cam = torch.zeros(1, 2, 4, 4)
    cam[0, 0, 0, 0] = 0.5  # block (0, 0) uncertain (its corner token is in (0.2, 0.7))
    cam[0, 0, 2, 2] = 0.6  # block (1, 1) uncertain
    cam[0, 0, 0, 2] = 0.9  # block (0, 1): confident foreground
    cam[0, 1, 2, 0] = 0.5  # block (1, 0): uncertain only for class 1, which the image does not have
    tags = torch.tensor([[1.0, 0.0]])
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        m = uncertainty_block_mask(cam, tags, block=2, ratio=0.5, low=0.2, high=0.7, guided=True, gen=g)
        expect = torch.zeros(4, 4, dtype=torch.bool)
        expect[:2, :2] = expect[2:, 2:] = True
        assert torch.equal(m[0], expect)
    # fewer uncertain blocks than the ratio asks: all of them, then random others; random phase: any
    m = uncertainty_block_mask(cam, tags, block=2, ratio=0.75, low=0.2, high=0.7, guided=True)
    assert m[0, :2, :2].all() and m[0, 2:, 2:].all() and int(m.sum()) == 12
    m = uncertainty_block_mask(cam, tags, block=2, ratio=0.5, low=0.2, high=0.7, guided=False)
    assert int(m.sum()) == 8
    # grids that blocks do not divide: blocks are cut at the border
    assert uncertainty_block_mask(torch.zeros(2, 1, 5, 3), torch.ones(2, 1), 2, 1.0, 0.2, 0.7, False).all()


def test_view_warp_follows_the_box_and_the_flip():
    S = 8
    xs = torch.arange(S, dtype=torch.float32).expand(1, 1, S, S)  # each pixel holds its x coordinate
    box = torch.tensor([[2.0, 0.0, 6.0, 8.0]])  # x from 2 to 6, all rows
    for flip in (False, True):
        v = View(torch.zeros(1, 3, S, S), box, torch.tensor([flip]))
        got = v.warp(xs, (S, S))[0, 0, 0]
        expect = 2 + (torch.arange(S) + 0.5) * 4 / S - 0.5  # pixel centres of the box (aligned roi_align)
        assert torch.allclose(got, expect.flip(0) if flip else expect, atol=1e-5)
    x = torch.randn(2, 3, S, S)
    v = random_resized_view(x, torch.Generator().manual_seed(0), jitter=0.0)
    assert torch.allclose(v.warp(x, (S, S)), v.image, atol=1e-6)  # no colour change: the view is the warp


def test_distillation_is_zero_when_student_and_teacher_agree_and_centre_is_an_ema():
    d = CenteredDistill(4, student_temp=0.1, teacher_temp=0.04, teacher_temp_end=0.07, warmup=10,
                        center_momentum=0.9)  # fmt: skip
    d.center.copy_(torch.tensor([[0.1, -0.2, 0.0, 0.3]]))
    t = torch.randn(3, 4)
    tau_t = 0.04 + 0.03 * 5 / 10
    assert d.teacher_temp(5) == pytest.approx(tau_t) and d.teacher_temp(10) == 0.07
    s = (t - d.center) * 0.1 / tau_t  # same distribution as the centred, sharpened teacher
    assert d(t, s, 5).abs().max() < 1e-5
    assert (d(t, torch.zeros(3, 4), 5) > 0).all()
    c0 = d.center.clone()
    d.update_center()
    assert torch.allclose(d.center, 0.9 * c0 + 0.1 * t.mean(0, keepdim=True), atol=1e-6)  # two calls, same rows
    # the centre can follow more rows than are distilled; the loss itself does not depend on them
    rows = torch.randn(7, 4)
    c1 = d.center.clone()
    kl = d(t, torch.zeros(3, 4), 10, center_rows=rows)
    assert torch.allclose(kl, d(t, torch.zeros(3, 4), 10))
    d._sum, d._count = None, 0  # drop the second call's statistics
    d(t, torch.zeros(3, 4), 10, center_rows=rows)
    d.update_center()
    assert torch.allclose(d.center, 0.9 * c1 + 0.1 * rows.mean(0, keepdim=True), atol=1e-6)


def test_patch_centre_follows_every_patch_token_of_the_view_not_only_the_masked_ones():
    m = _build()
    b = _batch()
    x = b["image"]
    out = m.encode(x)
    z = torch.zeros(1)
    st = StepState(x, b["tags"], b["valid"], out, out.feat, z, torch.rand(2, 3, 48, 48), torch.rand(2, 3, 48, 48),
                   z, z, 5000, torch.Generator().manual_seed(0))  # fmt: skip
    for mod in m.mods.values():
        mod.extend(st)
    mask = st.view_mask
    assert 0 < int(mask.sum()) < mask.numel()
    ema = m.mods["ema_teacher"]
    ema.distill_patch.train()
    ema.distill_patch._sum, ema.distill_patch._count = None, 0
    m.mods["uncertain_masking"].losses(st)
    assert ema.distill_patch._count == mask.numel()  # FSR's code: all B x h x w tokens (here 2 x 3 x 3)


def _build(*over, name="fsr"):
    torch.manual_seed(0)
    return build_method(load_config(None, [*TINY, "--method.name", name, "--method.seg_warmup", "1", *SMALL, *over]),
                        SPEC)  # fmt: skip


def test_teacher_is_an_exact_ema_of_the_student_and_gets_no_gradient():
    m = _build("--method.ema_teacher.momentum_iters", "0", "--method.ema_teacher.momentum", "0.9")
    ema = m.mods["ema_teacher"]
    m.train()
    assert not ema.teacher.training and not any(p.requires_grad for p in ema.teacher.parameters())
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    before = {n: p.clone() for n, p in ema.teacher.named_parameters()}
    out = m.train_step(_batch(), 1)
    out.loss.backward()
    assert all(p.grad is None for p in ema.teacher.parameters())
    assert ema.agg.token.grad.abs().sum() > 0 and m.mods["uncertain_masking"].mask_token.grad.abs().sum() > 0
    opt.step()
    m.on_step_end(1)
    student = dict(m.named_parameters())
    for n, p in ema.teacher.named_parameters():
        assert torch.allclose(p, 0.9 * before[n] + 0.1 * student[n], atol=1e-6), n
    qkv = "backbone.vit.blocks.0.attn.qkv.weight"
    assert not torch.equal(dict(ema.teacher.named_parameters())[qkv], before[qkv])  # it did move


def test_self_enhancement_sees_only_the_unmasked_confident_tokens():
    m = _build()
    b = _batch()
    x = b["image"]
    out = m.encode(x)
    z = torch.zeros(1)
    st = StepState(x, b["tags"], b["valid"], out, out.feat, z, torch.rand(2, 3, 48, 48), torch.rand(2, 3, 48, 48),
                   z, z, 5000, torch.Generator().manual_seed(0))  # fmt: skip
    for mod in m.mods.values():
        mod.extend(st)
    mask = st.view_mask
    assert mask.any() and not mask.all()
    a = m.mods["self_enhancement"].losses(st)["fsr_class"][1]
    # scribble over the second view inside the masked patches only: nothing the student sees changes
    view = st.view
    pix = mask.repeat_interleave(16, 1).repeat_interleave(16, 2)[:, None]
    view.image = torch.where(pix, torch.randn_like(view.image) * 5, view.image)
    st.teacher_out = None
    bb = m.mods["self_enhancement"].losses(st)["fsr_class"][1]
    assert a.item() == pytest.approx(bb.item(), abs=1e-6)
    # ...while a change in an unmasked patch does
    view.image[:, :, ~pix[0, 0]] += 1.0
    st.teacher_out = None
    assert abs(m.mods["self_enhancement"].losses(st)["fsr_class"][1].item() - a.item()) > 1e-6


def test_teacher_copies_other_modules_with_their_own_hooks():
    m = _build("--method.modules", "[cf_bilstm, class_tokens, ema_teacher, uncertain_masking, self_enhancement]")
    t = m.mods["ema_teacher"].teacher
    assert "mods.ema_teacher.teacher.mods.cf_bilstm.lstm.0.gate" in m.state_dict()
    x = _batch()["image"]
    ref = t.encode(x).feat
    with torch.no_grad():  # change the student's BiLSTM and class tokens: the teacher's output must not move
        m.mods["cf_bilstm"].lstm[0].gate.fill_(3.0)
        m.mods["class_tokens"].tok.feat.mul_(-2.0)
    assert torch.equal(t.encode(x).feat, ref)
    out = m.train_step(_batch(), 1)
    assert {"ctk_cls", "fsr_patch", "fsr_class"} <= set(out.logs)


def test_incompatible_stacks_are_refused():
    with pytest.raises(ConfigError, match="self_enhancement needs the ema_teacher module"):
        load_config(None, ["--method.modules", "[self_enhancement]"])
    with pytest.raises(ConfigError, match="uncertain_masking needs a ViT backbone.*resnet18 is a CNN"):
        _build("--model.backbone", "resnet18", "--model.aux_layer", "-2")


def test_modules_are_described_and_vit_only_stacks_are_refused_at_config_time():
    from wsss.methods.pipeline import describe_modules

    rows = {r["name"]: r for r in describe_modules()}
    assert rows["uncertain_masking"]["method"] == "fsr" and rows["uncertain_masking"]["losses"] == "fsr_patch"
    assert rows["uncertain_masking"]["needs"] == "ema_teacher" and rows["uncertain_masking"]["vit_only"]
    assert rows["uncertain_masking"]["warmup"] == "random_iters=4000"
    assert (
        rows["region_contrast"]["needs"] == "region_memory"
        and rows["spatial_contrast"]["losses"] == "sc_patch, sc_class"
    )
    stcl_spatial = ["--method.modules", "[temporal_contrast, spatial_contrast]"]
    for name, extra, losses, absent in (
        ("fsr", [], ("fsr_patch", "fsr_class"), ()),
        ("rca", ["--method.region_memory.enqueue_thre", "0"], ("rca_sc",), ()),
        # stcl's default is ToCo plus the temporal contrast; the spatial contrast is opt-in
        ("stcl", [], ("mem", "ptc", "ctc"), ("sc_patch", "sc_class")),
        ("stcl", stcl_spatial, ("mem", "sc_patch", "sc_class"), ()),
    ):
        # every loss a recipe's modules declare shows up by name in one training step's logs, no other
        m = _build(*extra, name=name)
        logs = m.train_step(_batch(), 1).logs
        assert set(losses) <= set(logs), (name, logs.keys())
        assert not set(absent) & set(logs), (name, logs.keys())
    with pytest.raises(ConfigError, match="cf_bilstm, uncertain_masking need a ViT backbone.*resnet50 is a CNN"):
        load_config(
            None, ["--model.backbone", "resnet50", "--method.modules", "[cf_bilstm, ema_teacher, uncertain_masking]"]
        )
    with pytest.raises(ConfigError, match="region_memory listed more than once"):
        load_config(None, ["--method.modules", "[region_memory, region_memory]"])


def test_predict_with_teacher_uses_the_teacher():
    m = _build("--method.ema_teacher.predict_with", "teacher")
    x = _batch()["image"]
    m.eval()
    t = m.mods["ema_teacher"].teacher
    assert torch.equal(m.predict_seg(x), t.predict_seg(x))
    with torch.no_grad():  # move only the student: predictions follow the teacher
        m.seg_head.cls.weight.add_(1.0)
    assert torch.equal(m.predict_seg(x), t.predict_seg(x))
    s = _build()
    s.eval()
    ref = s.predict_seg(x)
    with torch.no_grad():
        s.seg_head.cls.weight.add_(1.0)
    assert not torch.equal(s.predict_seg(x), ref)  # default: the student predicts
    with pytest.raises(ConfigError, match="predict_with must be student or teacher"):
        _build("--method.ema_teacher.predict_with", "ema")


def test_the_shared_projection_head_starts_as_fsrs_own_dino_head_did():
    """FSR's DINO head became ProjectionHead(last_init="trunc_normal"): same random draws in the same order (the
    last layer built as nn.Linear, then every layer trunc-normal), so seeded runs start where they did."""
    import torch.nn as nn

    from wsss.models.heads import ProjectionHead

    torch.manual_seed(3)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4))
    last = nn.Linear(4, 32, bias=False)
    for m in [*mlp, last]:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    torch.manual_seed(3)
    head = ProjectionHead(8, 32, 16, 4, last_init="trunc_normal")
    assert torch.equal(head.last, last.weight) and all(torch.equal(a, b) for a, b in zip(head.mlp.parameters(),
                                                                                         mlp.parameters()))  # fmt: skip
    x = torch.randn(5, 8)
    old = nn.functional.normalize(mlp(x), dim=-1) @ nn.functional.normalize(last.weight, dim=1).t()
    assert torch.equal(head(x), old)


def test_a_checkpoint_of_the_old_dino_head_layout_loads():
    from wsss.engine.checkpoint import load_weights

    m = _build()
    state = {k.replace("head.last", "head.last.weight") if k.endswith("head.last") else k: v.clone()
             for k, v in m.state_dict().items()}  # fmt: skip
    assert sum(k.endswith("head.last.weight") for k in state) == 2  # the student's head and the teacher's
    fresh = _build()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)  # so only loading can make it equal to m
    load_weights(fresh, state, "old.pt")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), m.state_dict().values()))
