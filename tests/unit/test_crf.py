"""Dense CRF backends: exact positional message, and both backends clean up noisy labels along colour edges."""

import importlib.util

import pytest
import torch

from wsss.cam.crf import CRFParams, _gauss_filter, apply_crf, bilateral_kernel


def test_positional_message_is_the_exact_gaussian_sum_without_self():
    q = torch.zeros(1, 1, 5, 5)
    q[0, 0, 2, 2] = 1.0
    m = _gauss_filter(q, sigma=1.0) - q  # the message excludes the pixel itself (centre tap exp(0) = 1)
    # neighbour at offset (dy, dx) receives exp(-(dy^2 + dx^2) / 2); the pixel itself receives nothing
    assert m[0, 0, 2, 2].item() == pytest.approx(0.0, abs=1e-6)
    assert m[0, 0, 2, 3].item() == pytest.approx(torch.exp(torch.tensor(-0.5)).item(), abs=1e-6)
    assert m[0, 0, 1, 1].item() == pytest.approx(torch.exp(torch.tensor(-1.0)).item(), abs=1e-6)
    assert m[0, 0, 0, 0].item() == pytest.approx(torch.exp(torch.tensor(-4.0)).item(), abs=1e-6)


def test_bilateral_kernel_values():
    img = torch.zeros(1, 3, 1, 2)
    img[0, :, 0, 1] = 10.0  # two pixels 1 px apart, colour distance sqrt(3) * 10
    k = bilateral_kernel(img, (1, 2), sxy=1.0, srgb=10.0)
    assert k[0, 0, 0].item() == pytest.approx(1.0)
    assert k[0, 0, 1].item() == pytest.approx(torch.exp(torch.tensor(-0.5 * (1 + 3))).item(), rel=1e-5)


def _noisy_case():
    """Left half black (class 0), right half white (class 1); 6 left pixels wrongly lean to class 1."""
    H, W = 16, 16
    img = torch.zeros(1, 3, H, W)
    img[..., W // 2 :] = 255.0
    truth = torch.zeros(H, W, dtype=torch.long)
    truth[:, W // 2 :] = 1
    p1 = torch.where(truth == 1, 0.7, 0.3)
    noisy = [(2, 2), (5, 6), (9, 1), (12, 4), (14, 7), (7, 3)]
    for y, x in noisy:
        p1[y, x] = 0.6
    probs = torch.stack([1 - p1, p1])[None]
    return probs, img, truth, noisy


@pytest.mark.parametrize(
    "backend",
    ["torch", pytest.param("dense", marks=pytest.mark.skipif(
        importlib.util.find_spec("pydensecrf") is None, reason="pydensecrf2 ([crf] extra) not installed"))],
)  # fmt: skip
def test_crf_fixes_noisy_pixels_inside_a_colour_region(backend):
    probs, img, truth, noisy = _noisy_case()
    before = probs.max(1).indices[0]
    assert all(before[y, x] == 1 for y, x in noisy)
    q = apply_crf(backend, probs, img, CRFParams(bi_xy=20.0, bi_rgb=10.0))
    assert q.shape == probs.shape
    assert torch.allclose(q.sum(1), torch.ones(1, 16, 16), atol=1e-4)
    assert torch.equal(q.max(1).indices[0], truth)


def test_crf_none_is_identity_and_unknown_backend_is_named():
    probs, img, _, _ = _noisy_case()
    assert apply_crf("none", probs, img) is probs
    with pytest.raises(KeyError, match="crf backend 'dens'.*did you mean 'dense'"):
        apply_crf("dens", probs, img)


def test_torch_crf_kernel_cache_and_chunking_do_not_change_the_result():
    probs, img, _, _ = _noisy_case()
    from wsss.cam.crf import torch_crf

    p = CRFParams(bi_xy=20.0, bi_rgb=10.0, max_side=8)
    a = torch_crf(probs, img, p)
    b = torch_crf(probs, img, CRFParams(bi_xy=20.0, bi_rgb=10.0, max_side=8, cache_mb=0), chunk=7)
    assert torch.allclose(a, b, atol=1e-6)
