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


def test_foreground_shares_count_band_and_background_apart():
    from wsss.data.classes import ClassSpec
    from wsss.evaluation.evaluators import PseudoLabelEvaluator, SegEvaluator, format_table

    # 8 scored pixels (one ignored): ground truth 4 foreground; the pseudo label 3 foreground, 2 band (255)
    target = torch.tensor([[0, 0, 0, 0, 1, 1, 2, 2, 255]])
    pseudo = torch.tensor([[0, 255, 0, 0, 1, 1, 255, 2, 1]])
    cm = ConfusionMatrix(3)
    cm.update(pseudo, target)
    assert cm.foreground_shares() == {"gt_fg": 4 / 8, "fg": 3 / 8, "abstain": 2 / 8}
    classes = ClassSpec(("cat", "dog"), background=True)
    ev = PseudoLabelEvaluator(classes)
    ev.process({"mask": target}, {"pseudo": pseudo})
    res_pseudo = ev.compute()
    assert res_pseudo["fg_share"] == {"pred": 3 / 8, "gt": 4 / 8, "band": 2 / 8}
    seg = torch.tensor([[1, 1, 1, 0, 0, 1, 2, 2, 0]])  # paints three background pixels as foreground
    ev = SegEvaluator(classes)
    ev.process({"mask": target}, {"seg": torch.nn.functional.one_hot(seg, 3).permute(0, 2, 1).float()[:, :, None]})
    res_seg = ev.compute()
    assert res_seg["fg_share"] == {"pred": 6 / 8, "gt": 4 / 8}
    table = format_table({"seg": res_seg, "pseudo": res_pseudo}, classes)
    assert table.splitlines()[-1] == "foreground pixels: ground truth 50.0%, seg 75.0%, pseudo 37.5%, pseudo band 25.0%"
    assert "fg_share" not in SegEvaluator(ClassSpec(("cat", "dog"), background=False)).compute()
