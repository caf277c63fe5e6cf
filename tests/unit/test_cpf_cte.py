"""CPF-CTE mechanisms: BiLSTM row/column context, class tokens, CAM fusion, and modules off == baseline."""

import pytest
import torch

from tests.conftest import TINY
from tests.methods.test_methods import SPEC, _batch
from wsss.build import build_method
from wsss.config import ConfigError, load_config
from wsss.models.blocks.bilstm import CFBiLSTM
from wsss.models.blocks.class_tokens import ClassTokens, gated_block


def test_bilstm_sees_whole_row_and_column_and_nothing_else():
    torch.manual_seed(0)
    blk = CFBiLSTM(dim=8, hidden=4, gate_init=1.0)
    grid = torch.randn(1, 4, 5, 8)
    moved = grid.clone()
    moved[0, 0, 0] += torch.randn(8)  # change the top-left token (not a constant shift: LayerNorm drops those)
    diff = (blk(moved) - blk(grid)).abs().sum(-1)[0]  # (4, 5)
    assert diff[0, 4] > 1e-4 and diff[3, 0] > 1e-4  # the far end of its row and of its column change
    assert torch.all(diff[1:, 1:] == 0)  # tokens sharing neither row nor column do not (one block)
    # a change at the right end reaches the left end too: the row LSTM runs both ways
    moved = grid.clone()
    moved[0, 2, 4] += torch.randn(8)
    assert (blk(moved) - blk(grid))[0, 2, 0].abs().sum() > 1e-4


def test_bilstm_with_zero_gate_is_the_identity_and_gate_gets_gradient():
    torch.manual_seed(0)
    blk = CFBiLSTM(dim=8, hidden=4)  # gate 0
    grid = torch.randn(2, 3, 3, 8)
    out = blk(grid)
    assert torch.equal(out, grid)
    out.pow(2).sum().backward()
    assert blk.gate.grad.abs().sum() > 0  # training opens the gate; the LSTMs learn from then on


def test_class_token_attention_maps_pick_class_rows_and_patch_columns():
    # T = 1 prefix + 4 patches (2x2) + 2 class tokens; two heads
    attn = torch.zeros(1, 2, 7, 7)
    attn[0, 0, 5, 1:5] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    attn[0, 1, 5, 1:5] = torch.tensor([0.3, 0.2, 0.1, 0.0])
    attn[0, :, 6, 4] = 1.0
    maps = ClassTokens.attention_maps(attn, first_patch=1, h=2, w=2)
    assert maps.shape == (1, 2, 2, 2)
    assert torch.allclose(maps[0, 0], torch.tensor([[0.2, 0.2], [0.2, 0.2]]))
    assert torch.allclose(maps[0, 1], torch.tensor([[0.0, 0.0], [0.0, 1.0]]))


def test_gated_block_is_the_timm_block_at_gate_1_and_ignores_the_class_tokens_at_gate_0():
    from timm.models.vision_transformer import Block

    torch.manual_seed(0)
    blk = Block(dim=16, num_heads=2).eval()
    x = torch.randn(2, 1 + 9 + 3, 16)  # prefix + 3x3 patches + 3 class tokens
    with torch.no_grad():
        full, alone = blk(x), blk(x[:, :10])
        one, zero = gated_block(blk, x, 3, torch.tensor(1.0)), gated_block(blk, x, 3, torch.tensor(0.0))
        half = gated_block(blk, x, 3, torch.tensor(0.5))
    assert torch.allclose(one, full, atol=1e-5)  # gate 1: the block's own joint attention
    assert torch.allclose(zero[:, :10], alone, atol=1e-5)  # gate 0: patches as if no class token were there
    assert torch.allclose(zero[:, 10:], full[:, 10:], atol=1e-5)  # the class tokens still read everything
    assert (half[:, :10] - full[:, :10]).abs().amax() > 1e-3 and (half[:, :10] - alone).abs().amax() > 1e-3


def test_class_tokens_start_as_the_identity_and_their_read_gate_learns():
    x = _batch()["image"]
    base = _build("--method.name", "cpf_cte", "--method.modules", "[]")
    m = _build("--method.name", "cpf_cte", "--method.modules", "[class_tokens]")
    m.backbone.load_state_dict(base.backbone.state_dict())
    with torch.no_grad():
        ref = base.backbone(x).feat
    out = m.backbone(x)
    assert torch.allclose(out.feat, ref, atol=1e-5) and out.extra.shape[1] == SPEC.num_fg  # patches intact
    m.cam_head.load_state_dict(base.cam_head.state_dict())
    m.cam_head(out.feat).sum().backward()  # a loss on the patches only
    tok = m.mods["class_tokens"].tok
    assert tok.gate.grad is not None and tok.gate.grad.abs().min() > 0  # both gates (blocks 4, 5) learn
    # ... and the gradient is the loss's true right-derivative at 0 (sign and size), block by block
    m, x64 = m.double(), x.double()
    tok.gate.grad = None
    m.cam_head(m.backbone(x64).feat).sum().backward()
    with torch.no_grad():
        base_loss = float(m.cam_head(m.backbone(x64).feat).sum())
        for j in range(2):
            tok.gate[j] = 1e-6
            slope = (float(m.cam_head(m.backbone(x64).feat).sum()) - base_loss) / 1e-6
            tok.gate[j] = 0.0
            assert abs(slope - float(tok.gate.grad[j])) < 1e-3 * abs(slope), (j, slope, tok.gate.grad)
    opened = _build("--method.name", "cpf_cte", "--method.modules", "[class_tokens]",
                    "--method.class_tokens.read_gate_init", "1.0")  # fmt: skip
    opened.backbone.load_state_dict(base.backbone.state_dict())
    with torch.no_grad():
        assert (opened.backbone(x).feat - ref).abs().amax() > 1e-3  # joint attention: the tokens act at once


def _build(*over):
    torch.manual_seed(0)
    return build_method(load_config(None, [*TINY, "--method.seg_warmup", "1", *over]), SPEC)


def test_class_tokens_get_gradient_from_their_classification_loss():
    m = _build("--method.name", "cpf_cte", "--method.modules", "[class_tokens]")
    out = m.train_step(_batch(), 0)
    assert "ctk_cls" in out.logs
    tok = m.mods["class_tokens"].tok
    m.zero_grad()
    loss = m.mods["class_tokens"].losses(_state_of(m))["ctk_cls"][1]
    loss.backward()
    assert tok.feat.grad.abs().sum() > 0 and tok.score_w.grad.abs().sum() > 0
    assert m.backbone.vit.blocks[-1].attn.qkv.weight.grad.abs().sum() > 0  # through the blocks they join
    assert m.cam_head.conv.weight.grad is None  # its own path: the patch CAM head is not involved


def _state_of(m):
    from wsss.methods.pipeline import StepState

    b = _batch()
    out = m.encode(b["image"])
    z = torch.zeros(1)
    return StepState(b["image"], b["tags"], b["valid"], out, out.feat, z, z, z, z, z, 0)


def test_cam_fusion_hand_computed_and_warmed_in():
    import dataclasses
    from types import SimpleNamespace

    m = _build("--method.name", "cpf_cte", "--method.modules", "[class_tokens]")
    mod = m.mods["class_tokens"]
    P = mod.prefix
    T = P + 4 + 3  # prefix, a 2 x 2 patch grid, 3 class tokens
    attn = torch.zeros(1, 2, T, T)
    attn[0, :, P + 4, P : P + 4] = torch.tensor([0.1, 0.2, 0.3, 0.4])  # class 0's token over the 4 patches
    out = SimpleNamespace(attn={mod.last: attn})
    cam = torch.zeros(1, 3, 2, 2)
    cam[0, 0] = torch.tensor([[2.0, 4.0], [0.0, 1.0]])  # normalised: 0.5, 1, 0, 0.25; attention: .25 .5 .75 1

    def fused(fuse, warm=0, steps=0):
        mod.cfg = dataclasses.replace(mod.cfg, fuse=fuse, fuse_warmup=warm)
        mod.steps.fill_(steps)
        return mod.fuse_cam(cam, out)[0, 0].flatten()

    close = dict(atol=1e-4)
    assert torch.allclose(fused("product"), torch.tensor([0.125, 0.5, 0.0, 0.25]), **close)
    assert torch.allclose(fused("geometric"), torch.tensor([0.125, 0.5, 0.0, 0.25]).sqrt(), **close)
    assert torch.allclose(fused("mean"), torch.tensor([0.375, 0.75, 0.375, 0.625]), **close)
    assert torch.equal(fused("none"), cam[0, 0].flatten())
    # warm-in over 4 steps: plain normalised CAM at step 0, a quarter fused after 1, fully fused from 4
    assert torch.allclose(fused("product", 4, 0), torch.tensor([0.5, 1.0, 0.0, 0.25]), **close)
    assert torch.allclose(fused("product", 4, 1), torch.tensor([0.40625, 0.875, 0.0, 0.25]), **close)
    assert torch.allclose(fused("product", 4, 9), torch.tensor([0.125, 0.5, 0.0, 0.25]), **close)
    mod.on_step_end(2)
    assert int(mod.steps) == 3 and "mods.class_tokens.steps" in m.state_dict()


def test_modules_off_is_exactly_the_baseline():
    base = _build()
    off = _build("--method.name", "cpf_cte", "--method.modules", "[]")
    sa, sb = base.state_dict(), off.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    la, lb = base.train_step(_batch(), 1), off.train_step(_batch(), 1)
    assert la.loss.item() == lb.loss.item() and la.logs.keys() == lb.logs.keys()
    # the BiLSTM alone, gate at 0, computes the same outputs as the baseline with the same weights
    lstm = _build("--method.name", "cpf_cte", "--method.modules", "[cf_bilstm]")
    lstm.load_state_dict(base.state_dict(), strict=False)
    x = _batch()["image"]
    base.eval(), lstm.eval()
    assert torch.equal(base.predict_seg(x), lstm.predict_seg(x))
    assert torch.equal(base.predict_cams(x), lstm.predict_cams(x))


def test_module_config_sections_and_errors():
    cfg = load_config(None, [*TINY, "--method.name", "cpf_cte", "--method.cf_bilstm.hidden", "8"])
    assert cfg.method.modules == ("cf_bilstm", "class_tokens") and cfg.method.cf_bilstm.hidden == 8
    with pytest.raises(ConfigError, match="method.cf_bilstm.hiden.*did you mean 'method.cf_bilstm.hidden'"):
        load_config(None, ["--method.name", "cpf_cte", "--method.cf_bilstm.hiden", "8"])
    with pytest.raises(ConfigError, match="unknown pipeline module 'cf_lstm'.*cf_bilstm"):
        load_config(None, ["--method.modules", "[cf_lstm]"])
    with pytest.raises(ConfigError, match="class_tokens.blocks must be in 1..5"):
        _build("--method.name", "cpf_cte", "--method.class_tokens.blocks", "6")
