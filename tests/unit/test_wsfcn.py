"""WS-FCN mechanisms (context aggregation, semantic fusion) and the CNN backbone behind the ViT interface."""

import dataclasses
import math

import pytest
import torch

from tests.conftest import TINY
from tests.methods.test_methods import SPEC, _batch
from wsss.build import build_method
from wsss.config import ConfigError, load_config
from wsss.models.blocks.context import ContextAggregation, SemanticFusion
from wsss.models.cnn import CNNBackbone, is_vit


def test_pooled_context_is_global_and_its_fine_grid_adds_locality():
    torch.manual_seed(0)
    x = torch.randn(1, 8, 12, 12)
    moved = x.clone()
    moved[0, :, 0, 0] += 3 * torch.randn(8)  # one corner cell
    for grids, local in (((1,), False), ((1, 6), True)):
        torch.manual_seed(1)
        blk = ContextAggregation(dim=8, grids=grids, hidden=16, gate_init=1.0)
        with torch.no_grad():
            diff = ((blk(moved) - moved) - (blk(x) - x)).abs().sum(1)[0]  # the context's change (12, 12)
        assert bool((diff > 1e-4).all())  # every cell moves: the global branch
        near, far = float(diff[0, 1] + diff[1, 0] + diff[1, 1]) / 3, float(diff[8:, 8:].mean())
        # global pooling alone moves every cell alike; the 6 x 6 grid moves the corner's neighbourhood more
        assert (near > 3 * far) == local, (grids, near, far)


def test_separable_dilated_branch_reads_exactly_the_dilated_lattice():
    from wsss.models.blocks.context import SeparableDilated

    for k, d, lattice in ((3, 2, (-2, 0, 2)), (5, 1, (-2, -1, 0, 1, 2)), (1, 1, (0,))):
        br = SeparableDilated(1, 1, k, d)
        with torch.no_grad():
            for conv in br.modules():
                if isinstance(conv, torch.nn.Conv2d):
                    conv.weight.fill_(1.0)
            x = torch.zeros(1, 1, 9, 10)
            x[0, 0, 4, 4] = 1.0
            y = br(x)[0, 0]
        assert y.shape == (9, 10)  # the grid is kept, even width included
        expect = torch.zeros(9, 10)
        for a in lattice:
            for b in lattice:
                expect[4 + a, 4 + b] = 2.0  # both paths (column-row, row-column) reach each lattice cell once
        assert torch.equal(y, expect), (k, d)
    with pytest.raises(ValueError, match="odd"):
        SeparableDilated(1, 1, 4, 1)


def test_channel_attention_hand_computed():
    from wsss.models.blocks.context import ChannelAttention

    ca = ChannelAttention(2)
    with torch.no_grad():
        for conv in (ca.mlp[0], ca.mlp[2]):
            conv.weight.copy_(torch.eye(2)[:, :, None, None])
    x = torch.tensor([[[[1.0, 3.0]], [[-2.0, 0.0]]]])  # (1, 2, 1, 2)
    # avg (2, -1) -> relu -> (2, 0); max (3, 0) -> (3, 0); weights sigmoid(5), sigmoid(0)
    s5 = 1 / (1 + math.exp(-5))
    assert torch.allclose(ca(x), torch.tensor([[[[s5, 3 * s5]], [[-1.0, 0.0]]]]), atol=1e-6)


def test_fca_dilations_follow_the_official_ones_at_stride_8_and_16():
    from wsss.models.blocks.context import fca_dilations

    assert fca_dilations(8) == (1, 12, 24, 36) and fca_dilations(16) == (1, 6, 12, 18)
    assert fca_dilations(14) == (1, 7, 14, 21) and fca_dilations(32) == (1, 3, 6, 9)


def test_fca_is_identity_at_gate_zero_and_its_context_is_global_plus_dilated_local():
    from wsss.models.blocks.context import FlexibleContext

    torch.manual_seed(0)
    x = torch.randn(1, 8, 12, 12)
    blk = FlexibleContext(8, 6, kernels=(1, 3), dilations=(1, 2), dropout=0.5)
    y = blk(x)
    assert torch.equal(y, x)
    y.pow(2).sum().backward()
    assert blk.gate.grad.abs().sum() > 0
    torch.manual_seed(0)
    blk = FlexibleContext(8, 6, kernels=(1, 3), dilations=(1, 2), dropout=0.5, gate_init=1.0).eval()
    moved = x.clone()
    moved[0, :, 0, 0] += 3 * torch.randn(8)
    with torch.no_grad():
        diff = (blk.context(moved) - blk.context(x)).abs().sum(1)[0]  # (12, 12)
        assert torch.equal(blk(x), blk(x))  # eval: no dropout, no batch statistics
    assert bool((diff > 1e-5).all())  # global pooling and the max-pooled channel attention reach every cell
    lattice = float(diff[0, 2] + diff[2, 0] + diff[2, 2]) / 3  # the 3-tap dilation-2 branch's reach
    off = float(diff[1, 1] + diff[0, 1] + diff[1, 0]) / 3  # next to the corner, off the dilated lattice
    far = float(diff[6:, 6:].mean())
    assert lattice > 5 * far and lattice > 5 * off, (lattice, off, far)
    glob = FlexibleContext(8, 6, kernels=(), dilations=(), gate_init=1.0).eval()
    with torch.no_grad():
        inner = glob.context(x)[..., 1:-1, 1:-1]  # away from the spatial attention's zero padding
    assert float(inner.std((2, 3)).max()) < 1e-5  # global pooling alone: one vector for every cell
    blk.train()
    with torch.no_grad():
        assert not torch.equal(blk(x), blk(x))  # dropout 0.5 on the context while training
        # The step's generator decides the mask (2 processes == 1 accumulating process), about half dropped.
        a, b = (blk.context(x, torch.Generator().manual_seed(7)) for _ in range(2))
        assert torch.equal(a, b) and not torch.equal(a, blk.context(x, torch.Generator().manual_seed(8)))
        assert 0.4 < float((a == 0).float().mean()) < 0.6


def test_fca_module_takes_its_dilations_from_the_backbone_stride_and_checks_its_config():
    over = [*TINY, "--method.name", "wsfcn", "--method.modules", "[context_aggregation]"]
    m = build_method(load_config(None, over), SPEC)
    mod = m.mods["context_aggregation"]
    assert mod.dilations == fca_dilations_of(m.backbone.patch_size) and len(mod.block.branches) == 4
    m = build_method(load_config(None, [*over, "--method.context_aggregation.dilations", "[1, 2, 3, 4]"]), SPEC)
    assert [b.col[0].dilation for b in m.mods["context_aggregation"].block.branches] == [(d, d) for d in (1, 2, 3, 4)]
    for bad, msg in ((["--method.context_aggregation.kernels", "[1, 4]"], "must be odd"),
                     (["--method.context_aggregation.dilations", "[1, 2]"], "one\\s+dilation"),
                     (["--method.context_aggregation.mode", "aspp"], "must be fca or pool")):  # fmt: skip
        with pytest.raises(ConfigError, match=msg):
            build_method(load_config(None, [*over, *bad]), SPEC)


def fca_dilations_of(stride):
    from wsss.models.blocks.context import fca_dilations

    return fca_dilations(stride)


def test_context_aggregation_gate_zero_is_identity_with_gradient():
    blk = ContextAggregation(dim=4, grids=(1, 2), hidden=2)
    x = torch.randn(2, 4, 5, 5)
    y = blk(x)
    assert torch.equal(y, x)
    y.pow(2).sum().backward()
    assert blk.gate.grad.abs().sum() > 0


def test_fusion_gate_zero_keeps_high_level_and_semantic_gate_controls_detail():
    torch.manual_seed(0)
    high, low = torch.randn(1, 4, 3, 3), torch.randn(1, 6, 6, 6)  # low-level: finer grid, other width
    fuse = SemanticFusion([6], dim=4, hidden=5)
    assert torch.equal(fuse(high, [low]), high)
    with torch.no_grad():
        fuse.gate.fill_(1.0)
    y = fuse(high, [low])
    assert y.shape == high.shape and not torch.equal(y, high)
    # detail is pooled to the high grid: y - high == sigmoid(sem(high)) * avgpool2(proj(low))
    detail = torch.nn.functional.avg_pool2d(fuse.proj[0](low), 2)
    assert torch.allclose(y - high, torch.sigmoid(fuse.sem(high)) * detail, atol=1e-6)
    # semantics that say "no object" close the gate: nothing of the low-level map gets in
    with torch.no_grad():
        fuse.sem.weight.zero_()
        fuse.sem.bias.fill_(-1e4)
    assert torch.equal(fuse(high, [low]), high)


def test_cnn_backbone_loads_a_local_weights_file(tmp_path):
    import timm

    ref = timm.create_model("resnet18", pretrained=False)
    with torch.no_grad():
        ref.conv1.weight.fill_(0.5)
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    bb = CNNBackbone("resnet18", str(tmp_path / "r18.pth"))
    assert bb.weights_source == f"file:{tmp_path / 'r18.pth'}" and bool((bb.net.conv1.weight == 0.5).all())


def test_cnn_backbone_strides_dims_layers_and_frozen_bn():
    torch.manual_seed(0)
    bb = CNNBackbone("resnet18", "none", output_stride=8, freeze_blocks=1)
    assert bb.dims == [64, 128, 256, 512] and bb.strides == [4, 8, 8, 8] and bb.embed_dim == 512
    out = bb(torch.randn(2, 3, 64, 64), layers=(0, -2))
    assert out.feat.shape == (2, 512, 8, 8) and out.prefix.shape == (2, 0, 512)
    assert out.layers[0].shape == (2, 64, 16, 16) and out.layers[2].shape == (2, 256, 8, 8)
    assert CNNBackbone("resnet18", "none", output_stride=16)(torch.randn(1, 3, 64, 64)).feat.shape[-1] == 4
    bb.train()
    assert not bb.net.bn1.training and bb.net.layer2.training  # BN statistics frozen, the rest trains
    assert not any(p.requires_grad for p in bb.net.layer1.parameters())
    assert all(p.requires_grad for p in bb.net.layer2.parameters())
    with pytest.raises(ValueError, match="no attention maps"):
        bb(torch.randn(1, 3, 32, 32), attn_layers=(0,))
    assert is_vit("vit_small_patch14_dinov2.lvd142m") and not is_vit("resnet101.tv2_in1k")
    with pytest.raises(ValueError, match="unknown timm model 'resnet_nope'"):
        is_vit("resnet_nope")


CNN = ["--model.backbone", "resnet18", "--model.aux_layer", "-2", "--data.crop_size", "64"]


@pytest.mark.parametrize("name", ["wsfcn", "rca"])
def test_methods_train_and_predict_on_a_cnn(name):
    torch.manual_seed(0)
    m = build_method(load_config(None, [*TINY, *CNN, "--method.name", name, "--method.seg_warmup", "0"]), SPEC)
    assert type(m.backbone).__name__ == "CNNBackbone" and m.aux_head.conv.in_channels == 256
    out = m.train_step(_batch(S=64), 0)
    out.loss.backward()
    assert m.backbone.net.conv1.weight.grad.abs().sum() > 0 and "seg" in out.logs  # (timm zero-inits block BNs)
    m.eval()
    assert m.predict_seg(torch.randn(1, 3, 50, 60)).shape == (1, SPEC.K, 50, 60)


def test_wsfcn_gates_zero_equal_the_baseline_and_vit_only_modules_refuse_a_cnn():
    torch.manual_seed(0)
    base = build_method(load_config(None, TINY), SPEC)
    torch.manual_seed(0)
    ws = build_method(
        load_config(None, [*TINY, "--method.name", "wsfcn", "--method.feature_fusion.layers", "[1]"]), SPEC
    )
    torch.manual_seed(0)
    off = build_method(load_config(None, [*TINY, "--method.name", "wsfcn", "--method.modules", "[]"]), SPEC)
    sa, sb = base.state_dict(), off.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ws.load_state_dict(base.state_dict(), strict=False)
    x = _batch()["image"]
    base.eval(), ws.eval()
    assert torch.equal(base.predict_seg(x), ws.predict_seg(x)) and torch.equal(base.predict_cams(x), ws.predict_cams(x))
    with torch.no_grad():
        ws.mods["context_aggregation"].block.gate.fill_(0.5)
    assert not torch.equal(base.predict_seg(x), ws.predict_seg(x))
    with pytest.raises(ConfigError, match="cf_bilstm, class_tokens need a ViT backbone.*resnet18 is a CNN"):
        load_config(None, [*TINY, *CNN, "--method.name", "cpf_cte"])
    # a config built around the check (e.g. by code) still fails at build, with the module's own reason
    vit = load_config(None, [*TINY, "--method.name", "cpf_cte"])
    cnn = dataclasses.replace(vit, model=load_config(None, [*TINY, *CNN]).model)
    with pytest.raises(ConfigError, match="cf_bilstm hooks into ViT blocks; CNNBackbone has none"):
        build_method(cnn, SPEC)


def test_warp_with_zero_flow_is_bilinear_upsampling_and_a_flow_moves_the_samples():
    from wsss.models.blocks.context import warp

    high = torch.randn(2, 3, 4, 5)
    up = torch.nn.functional.interpolate(high, size=(8, 10), mode="bilinear", align_corners=False)
    assert torch.allclose(warp(high, torch.zeros(2, 2, 8, 10)), up, atol=1e-5)
    ramp = torch.arange(4.0).expand(1, 1, 1, 4)  # value = coarse x index
    flow = torch.zeros(1, 2, 1, 8)
    flow[:, 0] = 2.0  # two fine cells to the right = one coarse cell
    got = warp(ramp, flow)[0, 0, 0]
    base = warp(ramp, torch.zeros(1, 2, 1, 8))[0, 0, 0]
    assert torch.allclose(got[1:5], base[1:5] + 1.0, atol=1e-5)  # inside the map: one coarse cell further
    assert got[-1].item() == pytest.approx(3.0)  # beyond the border: clamped


def test_flow_fusion_is_local_on_the_low_level_grid():
    from wsss.models.blocks.context import FlowAlignedFusion

    torch.manual_seed(0)
    fuse = FlowAlignedFusion(low_dim=6, dim=4, hidden=5).eval()
    torch.nn.init.normal_(fuse.flow.weight, std=0.3)  # a non-zero flow: the alignment takes part
    high, low = torch.randn(1, 4, 4, 4), torch.randn(1, 6, 16, 16)
    y = fuse(high, low)
    assert y.shape == (1, 4, 16, 16)  # the low-level grid (stride 4 for a stride-16 final map)
    moved = low.clone()
    moved[0, :, 8, 8] += 3.0
    diff = (fuse(high, moved) - y).abs().sum(1)[0]
    assert diff[8, 8] > 1e-3  # the fine cell that changed
    far = torch.ones(16, 16, dtype=torch.bool)
    far[6:11, 6:11] = False  # 3x3 branch conv + 3x3 flow conv: at most 2 cells away
    assert diff[far].max() == 0.0
    assert (fuse(high, low) - y).abs().max() == 0.0  # deterministic (no batch statistics)


def test_flow_fusion_module_feeds_the_seg_head_at_stride_4_of_a_cnn():
    from wsss.methods.pipeline import SEG_FEATURES

    torch.manual_seed(0)
    over = [*TINY, *CNN, "--model.output_stride", "16", "--method.name", "wsfcn", "--method.modules",
            "[feature_fusion]", "--method.feature_fusion.layers", "[0]", "--method.seg_warmup", "0"]  # fmt: skip
    m = build_method(load_config(None, over), SPEC).eval()
    x = torch.randn(1, 3, 64, 64)
    out = m.encode(x)
    assert out.feat.shape[-2:] == (4, 4) and out.maps[SEG_FEATURES].shape[-2:] == (16, 16)
    # gate 0: the seg head reads the upsampled final map
    up = torch.nn.functional.interpolate(out.feat, size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.equal(out.maps[SEG_FEATURES], up)
    before = m.predict_seg(x)
    with torch.no_grad():
        m.mods["feature_fusion"].gate.fill_(1.0)
    assert not torch.allclose(m.predict_seg(x), before) and m.predict_seg(x).shape == (1, SPEC.K, 64, 64)
    m.train()
    loss = m.train_step(_batch(S=64), 0)
    loss.loss.backward()
    assert m.mods["feature_fusion"].block.low_branch[0].weight.grad.abs().sum() > 0  # the seg loss reaches it
    with pytest.raises(ConfigError, match="mode flow fuses one low-level layer"):
        build_method(load_config(None, [*over[:-4], "--method.feature_fusion.layers", "[0, 1]"]), SPEC)
