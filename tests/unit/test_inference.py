"""Test-time protocol: scales, flips and their reduction (mean, or ToCo's max over scales)."""

import pytest
import torch

from wsss.config import ConfigError, load_config
from wsss.evaluation.inference import multi_scale_seg


class _ByScale:
    """predict_seg stand-in: logits (B, 2, H, W) that depend on the input's size and flip state: class 0
    scores the input width everywhere, class 1 the mean x-gradient sign of channel 0 (+1 unflipped)."""

    def predict_seg(self, x):
        B, _, H, W = x.shape
        c0 = torch.full((B, 1, H, W), float(W))
        sign = torch.sign(x[:, :1, :, 1:] - x[:, :1, :, :-1]).mean((1, 2, 3))[:, None, None, None]
        return torch.cat([c0, sign.expand(B, 1, H, W) * W / 10], 1)


def test_mean_and_max_reductions_hand_computed():
    x = torch.arange(8.0).expand(1, 3, 8, 8).contiguous()  # increasing along x: the flip reverses the sign
    m = _ByScale()
    # scales 1 and 2 give widths 8 and 16; with flip, class 1 cancels out per scale
    mean = multi_scale_seg(m, x, (1.0, 2.0), flip=True)
    assert torch.allclose(mean[:, 0], torch.full((1, 8, 8), (8 + 8 + 16 + 16) / 4))
    assert torch.allclose(mean[:, 1], torch.zeros(1, 8, 8))
    # ToCo: per scale the sum of image and flip (2 W), then the maximum over scales
    mx = multi_scale_seg(m, x, (1.0, 2.0), flip=True, reduce="max")
    assert torch.allclose(mx[:, 0], torch.full((1, 8, 8), 32.0)) and torch.allclose(mx[:, 1], torch.zeros(1, 8, 8))
    # without flip: class 1 is +W/10 per scale; max picks the larger scale, mean the average
    assert torch.allclose(multi_scale_seg(m, x, (1.0, 2.0), reduce="max")[:, 1], torch.full((1, 8, 8), 1.6))
    assert torch.allclose(multi_scale_seg(m, x, (1.0, 2.0))[:, 1], torch.full((1, 8, 8), 1.2))


def test_reduce_is_checked_and_the_voc_recipe_uses_the_papers_protocol():
    with pytest.raises(ConfigError, match="'eval.reduce' must be mean or max, got 'median'"):
        load_config(None, ["--eval.reduce", "median"])
    ev = load_config("configs/toco/voc_vit-b.yaml").eval
    assert ev.scales == (1.0, 1.25, 1.5) and ev.flip and ev.reduce == "max"
    assert load_config("configs/rca/voc_vit-b.yaml").eval.reduce == "max"  # inherited by every method
