import math

import torch

from wsss.losses.class_token_contrast import class_token_contrast, roi_from_cam, sample_local_crops


def test_ctc_hand_computed_one_image():
    # 1 teacher view, student outputs: view itself (pos), crop A (pos), crop B (neg); temp 1
    t = torch.tensor([[[1.0, 0.0]]])
    s = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.5, 0.0]]])
    flags = torch.tensor([[True, True, False]])
    e = [math.exp(1.0), math.exp(0.0), math.exp(0.5)]
    N = e[2]
    expect = -math.log(e[0] / (e[0] + N + 1e-4)) - math.log(e[1] / (e[1] + N + 1e-4)) - math.log(1 / (1 + N + 1e-4))
    expect /= 1 * (2 + 1e-4)
    assert math.isclose(float(class_token_contrast(t, s, flags, temp=1.0, cosine=False)), expect, rel_tol=1e-6)
    # cosine similarities: crop B (0.5, 0) has cosine 1 with the teacher; the global view 1, crop A 0
    c = [1.0, 0.0, 1.0]
    e = [math.exp(v / 0.25) for v in c]
    N = e[2]
    expect = -math.log(e[0] / (e[0] + N + 1e-4)) - math.log(e[1] / (e[1] + N + 1e-4)) - math.log(1 / (1 + N + 1e-4))
    expect /= 1 * (2 + 1e-4)
    assert math.isclose(float(class_token_contrast(t, s, flags, temp=0.25)), expect, rel_tol=1e-6)


def test_ctc_scale_is_fixed_unless_the_official_dot_product_is_asked_for():
    # Inflating the projector outputs (what aligning the weight-normalised rows does) cannot lower the
    # cosine loss, while it drives the dot-product loss by the scale: 16x outputs, 256x logits.
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(2, 2, 8, generator=g), torch.randn(2, 6, 8, generator=g)
    flags = torch.tensor([[1, 1, 1, 0, 1, 0], [1, 1, 0, 0, 1, 1]], dtype=torch.bool)
    base = class_token_contrast(t, s, flags)
    assert torch.allclose(class_token_contrast(16 * t, 16 * s, flags), base, rtol=1e-5)
    dot, dot16 = (class_token_contrast(k * t, k * s, flags, 0.5, cosine=False) for k in (1, 16))
    assert dot16 > 20 * dot


def test_ctc_without_negatives_is_finite_and_large_scores_do_not_overflow():
    t = torch.full((2, 2, 4), 30.0)
    s = torch.full((2, 5, 4), 30.0)
    v = class_token_contrast(t, s, torch.ones(2, 5, dtype=torch.bool), temp=0.5)
    assert torch.isfinite(v)


def test_crops_are_cut_at_sampled_centres_and_flagged_by_roi():
    H = W = 16
    img = torch.arange(H * W, dtype=torch.float32).view(1, 1, H, W).expand(1, 3, H, W).contiguous()
    cam = torch.zeros(1, 1, H, W)
    cam[..., 8:] = 1.0  # right half confident foreground
    roi = roi_from_cam(cam, torch.ones(1, 1), high=0.7, low=0.25)
    assert roi[0, 0, 0] == 0 and roi[0, 0, 15] == 2
    crops, flags, centres = sample_local_crops(img, roi, n=6, size=4, generator=torch.Generator().manual_seed(0))
    assert crops.shape == (6, 3, 4, 4) and flags.shape == (1, 6)
    for k, (y, x) in enumerate(centres[0].tolist()):
        assert x < 8  # centres only where the ROI is not confident foreground
        window = torch.zeros(4, 4)
        ys, xs = slice(max(y - 2, 0), min(y + 2, H)), slice(max(x - 2, 0), min(x + 2, W))
        window[ys.start - (y - 2) : ys.stop - (y - 2), xs.start - (x - 2) : xs.stop - (x - 2)] = img[0, 0, ys, xs]
        assert torch.equal(crops[k, 0], window)  # exact pixels, zero outside the image
        fg = roi[0, ys, xs].sum().item() / 16  # mean ROI value of the box
        assert bool(flags[0, k]) == (fg > 0.2)


def test_ctc_second_view_flip_or_independent_random_resized_crop():
    from tests.conftest import TINY
    from tests.methods.test_methods import SPEC, _batch
    from wsss.build import build_method
    from wsss.config import load_config
    from wsss.data.views import random_resized_view
    from wsss.methods.base import sample_generator
    from wsss.methods.toco import TOCO_VIEW2

    batch = {**_batch(), "index": torch.tensor([3, 5])}
    for view in ("flip", "random"):
        torch.manual_seed(0)
        m = build_method(load_config(None, [*TINY, "--method.ctc_view", view]), SPEC)
        seen = []
        enc = m.encode
        m.encode = lambda x, attn=True, seen=seen, enc=enc, **kw: seen.append(x) or enc(x, attn, **kw)  # noqa: E731
        m.train_step(batch, 0)
        x = batch["image"]
        # the training crop and the second view share one batched pass (same size)
        assert torch.equal(seen[0][:2], x)
        second = seen[0][2:]
        if view == "flip":
            assert torch.equal(second, x.flip(-1))
        else:
            gen = sample_generator(batch, 0, x.device, stream=1)
            # ToCo's datasets/voc.py: RandomResizedCrop(scale 0.4-1), jitter p 0.8, grey 0.2, blur 0.1, solarise 0.2
            assert TOCO_VIEW2 == {"scale": (0.4, 1.0), "p_jitter": 0.8, "p_gray": 0.2, "p_blur": 0.1, "p_solarize": 0.2}
            expect = random_resized_view(x, gen, **TOCO_VIEW2).image
            assert torch.equal(second, expect) and not torch.equal(second, x.flip(-1))
