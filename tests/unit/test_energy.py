import math

import torch

from wsss.losses.energy import dense_energy_loss


def test_energy_value_by_hand_on_two_pixels():
    # 1x2 image, grid kept at full size (scale 1): two pixels 1 px apart, same colour
    probs = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]]).requires_grad_()  # pixel 0 class 0, pixel 1 class 1
    image = torch.zeros(1, 3, 1, 2)
    label = torch.full((1, 1, 2), 255)  # unlabelled: gate 1
    valid = torch.ones(1, 1, 2, dtype=torch.bool)
    e = dense_energy_loss(probs, image, label, valid, sigma_xy=1.0, scale=1.0, weight=1.0)
    # W = [[1, e^-0.5], [e^-0.5, 1]]; S_0 = (1, 0), S_1 = (0, 1): E = -(1 + 1) (self terms only)
    assert math.isclose(float(e.detach()), -2.0, rel_tol=1e-6)
    same = torch.tensor([[[[1.0, 1.0]], [[0.0, 0.0]]]])
    e2 = dense_energy_loss(same, image, label, valid, sigma_xy=1.0, scale=1.0, weight=1.0)
    assert math.isclose(float(e2), -(2 + 2 * math.exp(-0.5)), rel_tol=1e-6)  # agreeing neighbours lower E
    e.backward()
    # gradient -2 * gate * (W S): for pixel 0, class 1: -2 * e^-0.5
    assert math.isclose(float(probs.grad[0, 1, 0, 0]), -2 * math.exp(-0.5), rel_tol=1e-6)


def test_confident_labelled_pixels_are_gated_out():
    probs = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    label = torch.tensor([[[0, 1]]])  # labelled, max prob 1 -> gate 0
    e = dense_energy_loss(probs, torch.zeros(1, 3, 1, 2), label, torch.ones(1, 1, 2, dtype=torch.bool), scale=1.0)
    assert float(e) == 0.0
