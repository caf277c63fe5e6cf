import math

import torch
import torch.nn.functional as F

from wsss.cam.permutohedral import gaussian_kernel, permutohedral_filter
from wsss.losses.energy import dense_energy_loss


def _image_features(B=2, H=24, W=28, sxy=10.0, srgb=15.0, seed=0):
    """Features (B, H*W, 5) of images with two flat colour regions plus noise, and the images."""
    g = torch.Generator().manual_seed(seed)
    img = torch.full((B, 3, H, W), 40.0)
    img[:, :, :, W // 2 :] = torch.tensor([200.0, 120.0, 30.0])[:, None, None]
    img = img + 6 * torch.randn(B, 3, H, W, generator=g)
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    pos = torch.stack([ys, xs], -1).view(1, H * W, 2) / sxy
    return torch.cat([pos.expand(B, -1, -1), img.flatten(2).transpose(1, 2) / srgb], -1), img


def test_lattice_estimates_the_exact_gaussian_sum_on_a_uniform_cloud():
    # the scale constant: inside a dense uniform 3-D cloud lattice / exact = 1
    g = torch.Generator().manual_seed(0)
    p = (torch.rand(1, 6000, 3, generator=g) - 0.5) * 8
    out = permutohedral_filter(p, torch.ones(1, 6000, 1))[0, :, 0]
    centre = p[0].abs().amax(1) < 1.0
    exact = gaussian_kernel(p[:, centre], p)[0].sum(1)
    ratio = out[centre] / exact
    assert abs(float(ratio.mean()) - 1) < 0.03 and float(ratio.std()) < 0.05


def test_lattice_is_linear_and_keeps_images_and_far_colours_apart():
    feat, _ = _image_features(srgb=5.0)  # the two regions are ~30 sigma apart in colour
    H, W = 24, 28
    left = (torch.arange(W) < W // 2).repeat(H).float()
    v1 = torch.rand(2, H * W, 3, generator=torch.Generator().manual_seed(1))
    v2 = torch.rand(2, H * W, 3, generator=torch.Generator().manual_seed(2))
    f1, f2, f12 = (permutohedral_filter(feat, v) for v in (v1, v2, 2 * v1 - 3 * v2))
    torch.testing.assert_close(f12, 2 * f1 - 3 * f2, rtol=1e-4, atol=1e-4)
    # values only on the left region reach no right-region pixel, and image 0 never reaches image 1
    only_left = v1 * left[None, :, None]
    only_left[1] = 0
    out = permutohedral_filter(feat, only_left)
    assert float(out[0][left == 0].abs().max()) == 0.0 and float(out[1].abs().max()) == 0.0
    assert float(out[0][left == 1].min()) > 0


def test_lattice_is_close_to_the_exact_filter_on_image_features():
    feat, _ = _image_features()
    v = torch.rand(2, feat.shape[1], 4, generator=torch.Generator().manual_seed(3))
    exact = torch.bmm(gaussian_kernel(feat, feat), v)
    approx = permutohedral_filter(feat, v)
    rel = float((approx - exact).norm() / exact.norm())
    cos = float(torch.nn.functional.cosine_similarity(approx.flatten(), exact.flatten(), dim=0))
    assert rel < 0.25 and cos > 0.995  # measured: 0.18 and 0.999 (a near-constant 0.82 scale)


def test_energy_matches_the_exact_dense_energy_and_gradient():
    _, img = _image_features(H=24, W=28)
    g = torch.Generator().manual_seed(4)
    probs = torch.randn(2, 3, 24, 28, generator=g).softmax(1).requires_grad_()
    label = torch.randint(0, 3, (2, 24, 28), generator=g)
    label[:, :, :6] = 255
    valid = torch.ones(2, 24, 28, dtype=torch.bool)
    valid[1, -4:] = False
    e = dense_energy_loss(probs, img, label, valid, sigma_xy=10.0, scale=1.0, weight=1.0)
    (grad,) = torch.autograd.grad(e, probs)
    # the exact dense energy, by hand: E = -(1/B) sum_i gate_i sum_k S_ik (W S)_ik
    feat, _ = _image_features(H=24, W=28)
    S = probs.detach() * valid[:, None]
    gate = torch.where(label == 255, torch.ones(2, 24, 28), 1 - S.amax(1)) * valid
    s = S.flatten(2)
    ws = torch.bmm(s, gaussian_kernel(feat, feat))
    exact = -(s * ws * gate.flatten(1)[:, None]).sum() / 2
    exact_grad = (-2 * ws * gate.flatten(1)[:, None] / 2 * valid.flatten(1)[:, None]).view_as(grad)
    assert 0.75 < float(e.detach()) / float(exact) < 1.05  # the lattice runs a little below where colours cluster
    cos = torch.nn.functional.cosine_similarity(grad.flatten(), exact_grad.flatten(), dim=0)
    assert float(cos) > 0.98


def test_energy_prefers_labels_that_follow_the_colour_regions():
    _, img = _image_features(B=1)
    H, W = 24, 28
    label = torch.full((1, H, W), 255)  # all unlabelled: gate 1
    valid = torch.ones(1, H, W, dtype=torch.bool)
    follow = torch.zeros(1, 2, H, W)
    follow[:, 0, :, : W // 2] = 1
    follow[:, 1, :, W // 2 :] = 1
    across = torch.zeros(1, 2, H, W)
    across[:, 0, : H // 2] = 1
    across[:, 1, H // 2 :] = 1
    kw = dict(sigma_xy=10.0, scale=1.0, weight=1.0)
    assert float(dense_energy_loss(follow, img, label, valid, **kw)) < float(
        dense_energy_loss(across, img, label, valid, **kw)
    )


def test_confident_labelled_pixels_are_gated_out():
    probs = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    label = torch.tensor([[[0, 1]]])  # labelled, max prob 1 -> gate 0
    e = dense_energy_loss(probs, torch.zeros(1, 3, 1, 2), label, torch.ones(1, 1, 2, dtype=torch.bool), scale=1.0)
    assert float(e) == 0.0
    assert math.isfinite(float(e))


def _energy_to_ce_gradient(side: int, ref_side: float) -> float:
    """Mean |d energy / d logits| over mean |d CE / d logits| on a two-region image of ``side`` px whose left
    half is labelled background, right half unlabelled (the band the regulariser is for)."""
    _, img = _image_features(B=1, H=24, W=24)
    img = F.interpolate(img, size=(side, side), mode="nearest")
    label = torch.zeros(1, side, side, dtype=torch.long)
    label[..., side // 2 :] = 255
    logits = F.interpolate(torch.randn(1, 3, 6, 6, generator=torch.Generator().manual_seed(3)), size=(side, side),
                           mode="bilinear").requires_grad_()  # fmt: skip
    valid = torch.ones(1, side, side, dtype=torch.bool)
    (g_e,) = torch.autograd.grad(dense_energy_loss(logits.softmax(1), img, label, valid, ref_side=ref_side), logits)
    (g_ce,) = torch.autograd.grad(F.cross_entropy(logits, label, ignore_index=255), logits)
    return float(g_e.abs().mean() / g_ce.abs().mean())


def test_energy_keeps_its_strength_against_the_ce_at_any_crop_size():
    # Official constants as given: the regulariser's pull grows 16x when the crop side doubles (its kernel mass
    # grows with the pixel count, the CE gradient shrinks with it). Rescaled to the crop: about the same pull.
    fixed = _energy_to_ce_gradient(96, 0.0) / _energy_to_ce_gradient(48, 0.0)
    scaled = _energy_to_ce_gradient(96, 448.0) / _energy_to_ce_gradient(48, 448.0)
    assert fixed > 10
    assert 0.7 < scaled < 1.4
    # at the reference side the constants are the official ones
    assert _energy_to_ce_gradient(448, 448.0) == _energy_to_ce_gradient(448, 0.0)
