import pytest
import torch

from wsss.cam.cam import minmax_normalize, multi_scale_cam
from wsss.cam.labels import cam_to_label, refine_pseudo_labels
from wsss.data.classes import ClassSpec

SPEC = ClassSpec(("a", "b", "c"))


def test_cam_to_label_training_thresholds_and_ignore_band():
    cam = torch.tensor([[[[0.9, 0.5], [0.1, 0.0]], [[0.2, 0.6], [0.2, 0.95]], [[1.0, 1.0], [1.0, 1.0]]]])
    tags = torch.tensor([[1.0, 1.0, 0.0]])  # class c absent: its CAM never counts
    lab = cam_to_label(cam, tags, SPEC, high=0.7, low=0.25)
    assert lab.tolist() == [[[1, 255], [0, 2]]]
    lab = cam_to_label(cam, tags, SPEC, bkg=0.55)
    assert lab.tolist() == [[[1, 2], [0, 2]]]
    valid = torch.tensor([[[True, True], [True, False]]])
    assert cam_to_label(cam, tags, SPEC, valid=valid).tolist() == [[[1, 255], [0, 255]]]


def test_cam_to_label_without_background_ignores_low_pixels():
    spec = ClassSpec(("a", "b"), background=False)
    cam = torch.tensor([[[[0.9, 0.1]], [[0.3, 0.2]]]])
    assert cam_to_label(cam, torch.ones(1, 2), spec).tolist() == [[[0, 255]]]


def test_minmax_and_multiscale_flip():
    x = torch.tensor([[[[1.0, 3.0], [5.0, 9.0]]]])
    assert torch.allclose(minmax_normalize(x), torch.tensor([[[[0, 0.25], [0.5, 1.0]]]]) * (8 / (8 + 1e-5)))
    img = torch.zeros(1, 3, 4, 4)
    img[..., 0] = 1.0  # left column bright

    def cam_fn(x):  # CAM = the red channel: the flipped image lights the right column
        return (x[:, :1],)

    (cam,) = multi_scale_cam(cam_fn, img, scales=(1.0,), flip=True)
    # max(cam, flip-back(flip cam)) = left column from both passes
    assert cam[0, 0, :, 0].min() > 0.99 and cam[0, 0, :, 1:].max() == 0


def test_refine_pseudo_labels_keeps_confident_and_uses_present_classes_only():
    H = W = 8
    image = torch.zeros(1, 3, H, W)
    image[..., 4:] = 1.0  # two flat regions
    cam = torch.zeros(1, 3, H, W)
    cam[0, 1, :, 4:] = 1.0  # class b fills the right half
    cam[0, 2] = 1.0  # class c everywhere but absent from the tags
    tags = torch.tensor([[0.0, 1.0, 0.0]])
    lab = refine_pseudo_labels(cam, image, tags, SPEC, scale=1.0, dilations=(1, 2))
    assert (lab[0, :, :4] == 0).all() and (lab[0, :, 4:] == 2).all()


def test_cam_head_topk_pooling_averages_each_class_top_fraction_of_patch_logits_by_hand():
    from wsss.models.heads import CAMHead

    feat = torch.zeros(1, 2, 2, 5)  # 10 patches; channel 0 drives class 0, channel 1 class 1
    feat[0, 0] = torch.tensor([[1.0, 9.0, 2.0, 0.0, 3.0], [4.0, 0.0, 8.0, 0.0, 0.0]])
    feat[0, 1, 1, 4] = 5.0
    feat[0, 1, 0, 0] = -5.0  # class 0 logits [[6, 9, 2, 0, 3], [4, 0, 8, 0, -5]]
    for pool, topk, want in [("topk", 0.2, [8.5, 2.5]), ("topk", 0.25, [23 / 3, 5 / 3]), ("topk", 0.01, [9.0, 5.0]),
                             ("gmp", 0.1, [9.0 - 5.0, 5.0])]:  # fmt: skip
        head = CAMHead(2, 2, pool, topk)
        with torch.no_grad():
            head.conv.weight.copy_(torch.tensor([[1.0, -1.0], [0.0, 1.0]])[:, :, None, None])
        x = feat.clone().requires_grad_(True)
        got = head(x)
        assert torch.allclose(got, torch.tensor([want])), (pool, topk, got)
        if pool == "topk" and topk == 0.2:  # only the two top patches of class 0 (values 9 and 8) get gradient
            got[0, 0].backward()
            assert torch.equal(x.grad[0, 0] != 0, (feat[0, 0] >= 8))
    with pytest.raises(ValueError, match="gmp or topk"):
        CAMHead(2, 2, "mean")
