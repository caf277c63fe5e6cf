import math

import torch

from wsss.evaluation.confusion import ConfusionMatrix


def test_exact_counts_iou_and_never_seen_class():
    cm = ConfusionMatrix(4, ignore_index=255)
    target = torch.tensor([[0, 0, 1, 1], [1, 2, 255, 2]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 2, 0, 3]])
    cm.update(pred, target)
    assert cm.mat.tolist() == [[1, 1, 0, 0], [1, 2, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]]
    r = cm.compute()
    # class 0: tp 1, gt 2, pred 2 -> 1/3; class 1: 2/(3+3-2)=0.5; class 2: 1/(2+1-1)=0.5; class 3: only predicted -> 0
    assert r["iou"][:3] == [1 / 3, 0.5, 0.5] and r["iou"][3] == 0.0
    assert math.isclose(r["miou"], (1 / 3 + 0.5 + 0.5 + 0) / 4)
    assert math.isclose(r["pixel_acc"], 4 / 7)


def test_class_absent_everywhere_is_nan_and_left_out():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 1]))
    r = cm.compute()
    assert math.isnan(r["iou"][2]) and r["miou"] == 1.0


def test_abstain_predictions_count_as_misses():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0, 255, 1, 1]), torch.tensor([0, 0, 1, 1]))
    r = cm.compute()
    assert cm.abstain.tolist() == [1, 0]
    assert r["iou"] == [0.5, 1.0] and r["coverage"] == 0.75


def test_matches_torchmetrics():
    from torchmetrics.classification import MulticlassConfusionMatrix, MulticlassJaccardIndex

    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 6, (3, 17, 19), generator=g)
    target[0, :4] = 255
    pred = torch.randint(0, 6, (3, 17, 19), generator=g)
    pred[target == 5] = 0  # class 5 is only in the ground truth
    cm = ConfusionMatrix(6)
    cm.update(pred, target)
    ref = MulticlassConfusionMatrix(6, ignore_index=255)(pred, target)
    assert torch.equal(cm.mat, ref)
    jac = MulticlassJaccardIndex(6, ignore_index=255, average="macro")(pred, target)
    assert math.isclose(cm.compute()["miou"], float(jac), rel_tol=1e-6)
