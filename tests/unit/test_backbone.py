import torch

from wsss.cam.cam import multi_scale_cam
from wsss.models.backbone import ViTBackbone, attention_map


def _vit(**kw):
    torch.manual_seed(0)
    return ViTBackbone("test_vit", "none", img_size=64, **kw).eval()


def test_token_maps_layers_and_attention_shapes():
    b = _vit()
    out = b(torch.randn(2, 3, 64, 48), layers=(-3,), attn_layers=(0,))
    assert out.feat.shape == (2, b.embed_dim, 4, 3) and out.layers[b.depth - 3].shape == (2, b.embed_dim, 4, 3)
    assert out.prefix.shape == (2, 1, b.embed_dim)
    a = out.attn[0]
    assert a.shape == (2, b.vit.blocks[0].attn.num_heads, 13, 13) and torch.allclose(
        a.sum(-1), torch.ones(2, a.shape[1], 13)
    )


def test_attention_map_matches_block_output():
    b = _vit()
    blk = b.vit.blocks[0]
    x = torch.randn(1, 5, b.embed_dim)
    attn = attention_map(blk, x)
    qkv = blk.attn.qkv(blk.norm1(x)).reshape(1, 5, 3, blk.attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    o = (attn @ qkv[2]).transpose(1, 2).reshape(1, 5, -1)
    assert torch.allclose(blk.attn.proj(o), blk.attn(blk.norm1(x)), atol=1e-5)


def test_non_multiple_sizes_are_resized_to_the_patch_grid():
    out = _vit()(torch.randn(1, 3, 50, 70))
    assert out.feat.shape[-2:] == (3, 4)  # round(50/16), round(70/16)


def test_freeze_blocks_stops_gradients_there():
    b = _vit(freeze_blocks=2).train()
    b(torch.randn(1, 3, 32, 32)).feat.sum().backward()
    assert all(p.grad is None for p in b.vit.blocks[1].parameters()) and b.vit.pos_embed.grad is None
    assert all(p.grad is not None for p in b.vit.blocks[2].parameters())


def test_multiscale_cam_with_reused_base_equals_full_computation():
    b = _vit()
    head = torch.nn.Conv2d(b.embed_dim, 3, 1)

    def fn(x):
        return (head(b(x).feat),)

    x = torch.randn(2, 3, 64, 64)
    full = multi_scale_cam(fn, x, (1.0, 0.5), True)[0]
    half = torch.nn.functional.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
    reused = multi_scale_cam(fn, x, (1.0, 0.5), True, base={1.0: fn(x), 0.5: fn(half)})[0]
    assert torch.allclose(full, reused, atol=1e-6)
    reused = multi_scale_cam(fn, x, (1.0, 0.5), True, base={0.5: fn(half)}, base_flip={1.0: fn(x.flip(-1))})[0]
    assert torch.allclose(full, reused, atol=1e-6)


def _saved(tmp_path, name: str) -> str:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    sd = timm.create_model(name, pretrained=False, num_classes=0).state_dict()
    path = str(tmp_path / f"{name}.safetensors")
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return path


def test_a_weights_file_loads_into_its_own_backbone_exactly(tmp_path):
    from safetensors.torch import load_file

    path = _saved(tmp_path, "test_vit")
    vit = ViTBackbone("test_vit", path, img_size=160).vit  # test_vit's own grid: no position resampling
    want = load_file(path)
    assert all(torch.equal(v, want[k]) for k, v in vit.state_dict().items())


def test_a_weights_file_of_another_backbone_is_an_error_naming_both(tmp_path):
    """timm only logs unexpected keys; a file of another architecture must not train silently."""
    import pytest

    from wsss.config import ConfigError

    path = _saved(tmp_path, "test_vit2")
    with pytest.raises(ConfigError, match=r"test_vit2.safetensors: these weights do not fit backbone 'test_vit': "):
        ViTBackbone("test_vit", path, img_size=48)
    from wsss.models.cnn import CNNBackbone

    with pytest.raises(ConfigError, match=r"do not fit backbone 'test_resnet': \d+ tensors the backbone has no place"):
        CNNBackbone("test_resnet", path)


def test_list_backbones_marks_pretrained_and_survives_a_closed_pipe():
    import os
    import subprocess
    import sys

    r, w = os.pipe()
    os.close(r)  # like `| head` gone before the list is printed: every write fails with EPIPE
    p = subprocess.run([sys.executable, "-m", "wsss", "list", "backbones"], stdout=w, stderr=subprocess.PIPE,
                       text=True, timeout=120)  # fmt: skip
    os.close(w)
    assert p.returncode == 0 and p.stderr == ""
    full = subprocess.run([sys.executable, "-m", "wsss", "list", "backbones"], capture_output=True, text=True).stdout
    assert "pretrained weights come from timm's hub" in full
    rows = {ln.split()[0]: ln for ln in full.splitlines() if ln and not ln[0].isupper() and "  " in ln}
    assert "pretrained: lvd142m" in rows["vit_small_patch14_dinov2"] and "fb_in1k" in rows["deit_small_patch16_224"]
    assert rows["vit_base_patch16_18x2_224"].endswith("no pretrained weights")
