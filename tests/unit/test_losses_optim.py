import math
from types import SimpleNamespace

import torch

from wsss.engine.optim import lr_factor
from wsss.losses.segmentation import balanced_seg_loss
from wsss.losses.token_contrast import affinity_targets, patch_token_contrast


def test_ptc_hand_computed_three_tokens():
    # tokens t0=(1,0), t1=(1,0), t2=(0,1): labels 1, 1, 0
    tokens = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]).view(1, 2, 1, 3)
    labels = torch.tensor([[[1, 1, 0]]])
    pos, neg = affinity_targets(labels.flatten(1))
    assert pos.sum() == 2 and neg.sum() == 4
    # positives (0,1),(1,0) have |cos| 1; negatives all 0 -> 0.5*(1 - 2/3) + 0.5*0
    assert math.isclose(float(patch_token_contrast(tokens, labels)), 0.5 * (1 - 2 / 3), rel_tol=1e-6)
    labels = torch.tensor([[[1, 255, 0]]])  # ignoring t1 leaves only negatives (0,2),(2,0), both 0
    assert float(patch_token_contrast(tokens, labels)) == 0.5


def test_balanced_seg_loss_averages_bg_and_fg():
    logits = torch.zeros(1, 3, 1, 4)
    logits[0, 0, 0, 0] = math.log(2)  # bg pixel with p(bg) = 2/4
    label = torch.tensor([[[0, 1, 2, 255]]])
    ce_bg = -math.log(0.5)
    ce_fg = -math.log(1 / 3)
    assert math.isclose(float(balanced_seg_loss(logits, label)), 0.5 * (ce_bg + ce_fg), rel_tol=1e-6)
    assert float(balanced_seg_loss(logits, torch.full((1, 1, 4), 255))) == 0.0


def test_lr_schedule_values():
    o = SimpleNamespace(lr=1e-4, warmup_lr=1e-6, warmup_iters=10, schedule="poly", power=0.9)
    assert math.isclose(lr_factor(0, 110, o), 0.01)
    assert math.isclose(lr_factor(5, 110, o), 0.01 + 0.99 * 0.5)
    assert lr_factor(10, 110, o) == 1.0
    assert math.isclose(lr_factor(60, 110, o), 0.5**0.9)
    o.schedule = "cosine"
    assert math.isclose(lr_factor(60, 110, o), 0.5, abs_tol=1e-12)
