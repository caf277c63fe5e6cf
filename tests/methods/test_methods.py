"""Every registered method: two CPU steps, finite losses, gradients reach the backbone, predictions' shapes."""

import pytest
import torch

from tests.conftest import TINY
from wsss.build import build_method
from wsss.config import load_config
from wsss.data.classes import ClassSpec
from wsss.engine.optim import build_optimizer
from wsss.registry import METHODS, MODULES

SPEC = ClassSpec(("a", "b", "c"))


def _batch(B=2, S=48):
    g = torch.Generator().manual_seed(0)
    tags = torch.tensor([[1.0, 0, 1], [0, 1, 0]])[:B]
    return {"image": torch.randn(B, 3, S, S, generator=g), "tags": tags, "valid": torch.ones(B, S, S, dtype=torch.bool),
            "mask": torch.randint(0, SPEC.K, (B, S, S), generator=g)}  # fmt: skip


def _tiny(name, seg_warmup):
    """(config, method) of registered method ``name`` on the tiny model, seg loss from ``seg_warmup``."""
    torch.manual_seed(0)
    over = ["--method.name", name, *TINY]
    if "seg_warmup" in METHODS.get(name).Config.__dataclass_fields__:
        over += ["--method.seg_warmup", str(seg_warmup)]
    cfg = load_config(None, over)
    return cfg, build_method(cfg, SPEC)


@pytest.mark.parametrize("name", METHODS.names())
def test_two_steps_and_gradients(name):
    cfg, m = _tiny(name, 1)
    opt = build_optimizer(m, cfg.optim)
    batch = _batch()
    for it in range(2):  # it=1 is past every warm-up: all losses on
        out = m.train_step(batch, it)
        assert torch.isfinite(out.loss)
        opt.zero_grad()
        out.loss.backward()
        grads = [p.grad for p in m.backbone.vit.blocks[0].parameters() if p.grad is not None]
        assert grads and sum(float(g.abs().sum()) for g in grads) > 0
        opt.step()
    assert all(torch.isfinite(torch.tensor(float(v))) for v in out.logs.values())
    m.eval()
    x = batch["image"][:1, :, :40, :44]
    assert m.predict_seg(x).shape == (1, SPEC.K, 40, 44)
    if m.has_cams:
        cam = m.predict_cams(x)
        assert cam.shape == (1, 3, 40, 44) and cam.min() >= 0 and cam.max() <= 1
        lab = m.pseudo_labels(x, batch["tags"][:1])
        assert lab.shape == (1, 40, 44) and set(lab.unique().tolist()) <= {0, 1, 3, 255}


@pytest.mark.parametrize("name", METHODS.names())
def test_two_steps_under_bf16_autocast(name):
    """The AMP path's dtype handling (bf16 activations, fp32 losses and weights), checked on CPU autocast."""
    _, m = _tiny(name, 0)
    for it in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m.train_step(_batch(), it)
        assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
        m.zero_grad()
        out.loss.backward()
        m.on_step_end(it)
        grads = [p.grad for p in m.backbone.vit.blocks[0].parameters() if p.grad is not None]
        assert grads and all(g.dtype == torch.float32 for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(torch.isfinite(torch.tensor(float(v))) for v in out.logs.values())


def test_toco_seg_loss_only_after_warmup():
    cfg = load_config(None, TINY + ["--method.seg_warmup", "5"])
    m = build_method(cfg, SPEC)
    assert "seg" not in m.train_step(_batch(), 4).logs
    out = m.train_step(_batch(), 5)
    assert "seg" in out.logs and "reg" in out.logs and out.logs["reg"] <= 0
    out.loss.backward()
    assert m.seg_head.cls.weight.grad.abs().sum() > 0


def test_toco_ctc_teacher_is_ema_of_student_projector_and_gets_no_gradient():
    cfg = load_config(None, TINY + ["--method.ctc_local_size", "32", "--method.ctc_momentum", "0.75"])
    m = build_method(cfg, SPEC)
    opt = build_optimizer(m, cfg.optim)
    out = m.train_step(_batch(), 0)
    assert "ctc" in out.logs
    out.loss.backward()
    assert all(p.grad is None for p in m.proj_t.parameters())
    assert m.proj.last.grad.abs().sum() > 0 and m.backbone.vit.cls_token.grad.abs().sum() > 0
    before_t = m.proj_t.last.detach().clone()
    opt.step()
    m.on_step_end(0)
    assert torch.allclose(m.proj_t.last, 0.75 * before_t + 0.25 * m.proj.last.detach())
    assert not any(id(p) in {id(q) for g in opt.param_groups for q in g["params"]} for p in m.proj_t.parameters())


def test_toco_ctc_off_has_no_projector():
    m = build_method(load_config(None, TINY + ["--method.w_ctc", "0"]), SPEC)
    assert not hasattr(m, "proj") and "ctc" not in m.train_step(_batch(), 0).logs


STACKING = [n for n in METHODS.names() if "modules" in METHODS.get(n).Config.__dataclass_fields__]


@pytest.mark.parametrize("name", STACKING)
def test_one_batched_pass_of_two_views_equals_two_passes(name):
    """toco runs its two global views as one batch: every module's feature refinement must be per image."""
    from wsss.models.backbone import split_output

    torch.manual_seed(0)
    m = build_method(load_config(None, ["--method.name", name, *TINY]), SPEC).eval()
    for mod in m.mods.values():
        if hasattr(mod, "bank"):  # a memory that is not empty, so that aggregation over it really runs
            mod.bank.push(torch.randn(6, mod.bank.feats.shape[-1]), torch.tensor([0, 0, 1, 1, 2, 2]))
        for p in mod.parameters():  # zero-initialised gates would hide a batch-mixing refinement
            torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(4, 3, 48, 48)
    with torch.no_grad():
        first, second = split_output(m.encode(x), 2)
        a, b = m.encode(x[:2]), m.encode(x[2:])
    close = dict(rtol=1e-4, atol=1e-4)  # fp32 rounding of other matmul shapes; mixing images would be O(1)
    for got, ref in ((first, a), (second, b)):
        torch.testing.assert_close(got.feat, ref.feat, **close)
        torch.testing.assert_close(got.prefix, ref.prefix, **close)
        for k in ref.layers:
            torch.testing.assert_close(got.layers[k], ref.layers[k], **close)
    assert not torch.allclose(first.feat, second.feat)


@pytest.mark.parametrize("balanced", [True, False])
def test_toco_seg_loss_is_the_balanced_or_the_plain_ce(balanced):
    """Pseudo labels with 1 background and 3 foreground pixels per image: the balanced CE weighs the one
    background pixel like the three foreground ones, the plain CE weighs every pixel alike."""
    from wsss.losses.segmentation import balanced_seg_loss, seg_loss

    torch.manual_seed(0)
    m = build_method(load_config(None, [*TINY, "--method.seg_warmup", "0", "--method.w_reg", "0",
                                        "--method.seg_balanced", str(balanced).lower()]), SPEC)  # fmt: skip
    labels = torch.full((2, 48, 48), 255)
    labels[:, 0, :4] = torch.tensor([0, 1, 1, 1])
    m._par_pseudo_labels = lambda *a: labels
    seen = []
    head = m.seg_head.forward
    m.seg_head.forward = lambda f: seen.append(head(f)) or seen[-1]
    out = m.train_step(_batch(), 0)
    logits = torch.nn.functional.interpolate(seen[0].detach(), size=(48, 48), mode="bilinear", align_corners=False)
    bal, plain = (float(f(logits, labels)) for f in (balanced_seg_loss, seg_loss))
    assert abs(bal - plain) > 1e-3  # the two weightings differ on these labels
    assert float(out.logs["seg"]) == pytest.approx(bal if balanced else plain, rel=1e-5)


# Overrides that let every module act on the tiny batch from its second step: memories written at
# once, losses from iteration 0, one-token mask blocks, a small teacher head.
ACT = ["--method.region_memory.enqueue_thre", "0", "--method.temporal_contrast.enqueue_thre", "0",
       "--method.temporal_contrast.min_entries", "1", "--method.uncertain_masking.block", "1",
       "--method.uncertain_masking.random_iters", "0", "--method.ema_teacher.out_dim", "64",
       "--method.ema_teacher.hidden", "32", "--method.ema_teacher.bottleneck", "16",
       "--method.feature_fusion.layers", "[0]"]  # fmt: skip
COMPANION = {"ema_teacher": ["self_enhancement"]}  # a host module with no loss of its own: with one user


def _stack(name):
    mods = []
    for n in [name, *COMPANION.get(name, [])]:
        mods += [d for d in MODULES.get(n).needs if d not in mods] + [n]
    return mods


@pytest.mark.parametrize("name", MODULES.names())
def test_module_contract_alone_on_toco(name):
    """Each module alone on toco (with what it needs): every loss of its own is non-zero by the second
    step, the step's gradient reaches the module's trainable parameters, and a state-dict round trip
    (memories, teachers, centres) gives a model that takes the same next step."""
    mods = _stack(name)
    over = [*TINY, "--method.seg_warmup", "0", "--method.modules", f"[{', '.join(mods)}]"]
    for key, val in zip(ACT[::2], ACT[1::2]):
        if key.split(".")[1] in mods:
            over += [key, val]
    cfg = load_config(None, over)
    torch.manual_seed(0)
    m = build_method(cfg, SPEC)
    opt = build_optimizer(m, cfg.optim)
    batch = _batch()
    for it in range(2):
        out = m.train_step(batch, it)
        opt.zero_grad()
        out.loss.backward()
        if it == 1:
            for loss in MODULES.get(name).loss_names:
                assert loss in out.logs and float(out.logs[loss]) != 0.0, (loss, out.logs)
            own = [p for p in m.mods[name].parameters() if p.requires_grad]
            if own:
                assert sum(float(p.grad.abs().sum()) for p in own if p.grad is not None) > 0, name
        opt.step()
        m.on_step_end(it)
    torch.manual_seed(1)  # a different initialisation: everything must come from the state dict
    again = build_method(cfg, SPEC)
    again.load_state_dict(m.state_dict())
    losses = []
    for model in (m, again):
        torch.manual_seed(2)  # the same global random state for both steps
        losses.append(model.train_step(batch, 2).loss)
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-6, abs=1e-7)


def test_toco_contrast_start_and_auxiliary_pseudo_labels_before_aux_labels_until():
    cfg = load_config(None, TINY + ["--method.seg_warmup", "0", "--method.contrast_start", "3",
                                    "--method.aux_labels_until", "3"])  # fmt: skip
    torch.manual_seed(0)
    m = build_method(cfg, SPEC)
    seen = []
    refine = m._par_pseudo_labels
    m._par_pseudo_labels = lambda cam, *a: seen.append(cam) or refine(cam, *a)
    early, late = m.train_step(_batch(), 2), m.train_step(_batch(), 3)
    assert "ptc" not in early.logs and "ctc" not in early.logs and "seg" in early.logs
    assert "ptc" in late.logs and "ctc" in late.logs
    # the same weights and batch: the two steps' CAM pairs are the same; step 2 refined the auxiliary CAM
    from wsss.cam.cam import multi_scale_cam

    with torch.no_grad():
        cam, aux = multi_scale_cam(m._cams_of_image, _batch()["image"], cfg.method.cam_scales, cfg.method.cam_flip)
    assert not torch.allclose(cam, aux)
    assert torch.allclose(seen[0], aux, atol=1e-5) and torch.allclose(seen[1], cam, atol=1e-5)


def test_module_refine_labels_hook_edits_the_pseudo_labels_of_training_and_of_pseudo_labels():
    """A module's ``refine_labels`` runs after PAR on every pseudo label the host makes: here it marks
    background uncertain, so the seg loss and ``pseudo_labels`` both see no 0 label."""
    from wsss.methods.pipeline import PipelineModule

    class NoBackground(PipelineModule):
        def refine_labels(self, labels, cam, images, tags, valid):
            return labels.masked_fill(labels == 0, 255)

    torch.manual_seed(0)
    m = build_method(load_config(None, [*TINY, "--method.seg_warmup", "0"]), SPEC)
    b = _batch()
    plain = m.pseudo_labels(b["image"], b["tags"], b["valid"])
    assert (plain == 0).any() and (plain != 0).any()
    m.mods["no_bg"] = NoBackground(None, m)
    assert torch.equal(m.pseudo_labels(b["image"], b["tags"], b["valid"]), plain.masked_fill(plain == 0, 255))
    seen = []
    refine = NoBackground.refine_labels
    m.mods["no_bg"].refine_labels = lambda *a: seen.append(refine(m.mods["no_bg"], *a)) or seen[-1]
    m.train_step(b, 0)
    assert len(seen) == 1 and not (seen[0] == 0).any() and (seen[0] != 255).any()
