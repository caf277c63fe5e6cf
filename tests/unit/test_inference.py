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


class _WindowMean:
    """predict_seg stand-in that is not local: both classes score the mean of channel 0 over the whole input,
    so a pixel's sliding-window logit is the mean of the means of the windows covering it. Records the
    input shapes."""

    def __init__(self):
        self.shapes = []

    def predict_seg(self, x):
        self.shapes.append(tuple(x.shape))
        m = x[:, :1].mean((2, 3), keepdim=True).expand(-1, 1, *x.shape[-2:])
        return torch.cat([m, -m], 1)


def test_sliding_windows_average_the_windows_covering_each_pixel():
    from wsss.evaluation.inference import sliding_seg, window_starts

    assert window_starts(6, 4, 2) == [0, 2] and window_starts(10, 4, 3) == [0, 3, 6] and window_starts(9, 4, 3) == [
        0, 3, 5] and window_starts(4, 4, 1) == [0]  # fmt: skip
    x = torch.arange(6.0).expand(2, 3, 4, 6).contiguous()  # value = column index; two images
    x[1] *= 10
    m = _WindowMean()
    # window 4, overlap 0.5 -> stride 2: windows over columns 0-3 (mean 1.5) and 2-5 (mean 3.5), full height
    y = sliding_seg(m, x, window=4, overlap=0.5)
    want = torch.tensor([1.5, 1.5, 2.5, 2.5, 3.5, 3.5])
    assert torch.equal(y[0, 0], want.expand(4, 6)) and torch.equal(y[1, 0], 10 * want.expand(4, 6))
    assert torch.equal(y[:, 1], -y[:, 0])
    assert m.shapes == [(4, 3, 4, 4)]  # both windows of both images in one forward, window clipped to H = 4
    # a window covering the image is the whole-image prediction
    assert torch.equal(multi_scale_seg(m, x, window=8), multi_scale_seg(m, x))


def test_sliding_windows_tile_a_large_image_at_the_window_size_in_bounded_chunks(monkeypatch):
    from wsss.evaluation import inference

    m = _WindowMean()
    x = torch.rand(1, 3, 50, 70)
    # stride 12: rows 0 12 24 34, columns 0 12 24 36 48 54
    y = multi_scale_seg(m, x, scales=(1.0,), flip=True, window=16, overlap=0.25)
    n = len(inference.window_starts(50, 16, 12)) * len(inference.window_starts(70, 16, 12))
    assert n == 4 * 6 and sum(s[0] for s in m.shapes) == 2 * n  # the image and its flip in every window
    assert all(s[-2:] == (16, 16) and s[0] <= 2 * inference.WINDOW_CHUNK for s in m.shapes)
    # the chunking is invisible: one window per forward, or all at once, gives the same logits
    for chunk in (1, 1000):
        monkeypatch.setattr(inference, "WINDOW_CHUNK", chunk)
        assert torch.equal(multi_scale_seg(m, x, scales=(1.0,), flip=True, window=16, overlap=0.25), y)
    with pytest.raises(ConfigError, match="eval.window must be >= 0 and eval.overlap in"):
        load_config(None, ["--eval.overlap", "1.0"])


def test_sliding_windows_of_a_pointwise_model_equal_whole_image_inference():
    """Stitching: for a model whose logit at a pixel depends on that pixel only, windows of any size and
    overlap (chunks of more than WINDOW_CHUNK windows, two images, flips, two scales, odd sides) give the
    whole-image logits."""

    class Pointwise:
        def __init__(self):
            self.w = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))

        def predict_seg(self, x):
            return torch.einsum("kc,bchw->bkhw", self.w, x)

    m, x = Pointwise(), torch.randn(2, 3, 37, 53, generator=torch.Generator().manual_seed(1))
    whole = multi_scale_seg(m, x, (1.0, 0.75), flip=True)
    for window, overlap in ((8, 1 / 3), (16, 0.0), (5, 0.9), (64, 0.5)):
        got = multi_scale_seg(m, x, (1.0, 0.75), flip=True, window=window, overlap=overlap)
        assert torch.allclose(got, whole, atol=1e-5), (window, overlap)
