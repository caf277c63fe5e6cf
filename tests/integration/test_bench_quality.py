"""``wsss bench quality``: statistics against hand-computed values, resume, ablation rows, data detection."""

import json
from pathlib import Path

import pytest
import torch

from wsss.bench import quality as q
from wsss.bench.report import paired_diff, render_table, summarize
from wsss.bench.speed import bench_speed, peak_memory_mb, proc_status_mb
from wsss.cli import main
from wsss.config import ConfigError
from wsss.data.io import DataError


def _run(seg, cam=None, pseudo=None):
    run = {"seg": seg, "per_class": {"seg": [seg, seg / 2]}, "minutes": 1.0}
    if cam is not None:
        run.update(cam=cam, cam_oracle=cam + 0.01, pseudo=pseudo, per_class={"cam": [cam, 0.0], "pseudo": [pseudo, 0.0],
                                                                            "seg": [seg, seg / 2]})  # fmt: skip
    return run


ROWS = [
    {"label": "toco", "baseline": None, "reference": False,
     "runs": {"0": _run(0.30, 0.20, 0.25), "1": _run(0.34, 0.24, 0.29)}},
    {"label": "better", "baseline": "toco", "reference": False,
     "runs": {"0": _run(0.33, 0.20, 0.26), "1": _run(0.35, 0.25, 0.30)}},
    {"label": "mixed", "baseline": "toco", "reference": False,
     "runs": {"0": _run(0.32, 0.20, 0.25), "1": _run(0.33, 0.24, 0.29)}},
    {"label": "fully_supervised", "baseline": None, "reference": True, "runs": {"0": _run(0.60), "1": _run(0.68)}},
]  # fmt: skip


def test_statistics_and_table_equal_hand_computed_values():
    s = summarize(ROWS)
    assert s["toco"]["seg"]["mean"] == pytest.approx(0.32) and s["toco"]["seg"]["std"] == pytest.approx(0.02 * 2**0.5)
    # paired differences: better - toco = +0.03, +0.01 -> mean 0.02, sample std 0.01 * sqrt(2)
    d = s["better"]["diff"]["seg"]
    assert d["per_seed"] == pytest.approx({"0": 0.03, "1": 0.01})
    assert d["mean"] == pytest.approx(0.02) and d["std"] == pytest.approx(0.01 * 2**0.5) and d["verdict"] == ""
    # mixed - toco = +0.02, -0.01: the seeds disagree in sign
    assert s["mixed"]["diff"]["seg"]["verdict"] == "noise"
    # ratios seed by seed: 0.30 / 0.60 = 0.5 and 0.34 / 0.68 = 0.5
    assert s["toco"]["ratio"]["mean"] == pytest.approx(0.5) and s["toco"]["ratio"]["std"] == pytest.approx(0.0)
    assert s["better"]["ratio"]["mean"] == pytest.approx((0.33 / 0.60 + 0.35 / 0.68) / 2)
    assert s["toco"]["per_class"]["pseudo"] == pytest.approx([0.27, 0.0])
    assert "diff" not in s["toco"] and "diff" not in s["fully_supervised"]
    quality = {"command": "wsss bench quality ...", "commits": ["abc1234"], "seeds": [0, 1], "val_images": 4,
               "backbone": "test_vit", "weights": "none", "eval": "scales [1.0]", "classes": ["background", "cat"],
               "rows": ROWS, "summary": s}  # fmt: skip
    table = render_table(quality)
    assert "| toco | 2 | 22.00 ± 2.83 | 23.00 ± 2.83 | 27.00 ± 2.83 | 32.00 ± 2.83 | 0.50 ± 0.00 | - |" in table
    assert "| better | 2 |" in table and "| +2.00 ± 1.41 | toco |" in table
    assert "| +0.50 ± 2.12 (noise) | toco |" in table
    assert "| fully_supervised (reference) | 2 | - | - | - | 64.00 ± 5.66 | - | - | - |" in table
    # per-class chain of toco: CAM 22, pseudo 27, seg 32 beside the reference's 64 (gap -32)
    assert "| background | 22.0 | 27.0 | 32.0 | 64.0 | -32.0 |" in table
    assert "Foreground share" not in table  # runs without shares (older evaluations): no table


def test_foreground_share_table_equals_hand_computed_values():
    shares = ({"gt_fg": 0.125, "pseudo_fg": 0.20, "pseudo_band": 0.10, "seg_fg": 0.40},
              {"gt_fg": 0.125, "pseudo_fg": 0.30, "pseudo_band": 0.14, "seg_fg": 0.50})  # fmt: skip
    rows = [{"label": "toco", "baseline": None, "reference": False,
             "runs": {"0": _run(0.30, 0.2, 0.25) | shares[0], "1": _run(0.34, 0.24, 0.29) | shares[1]}}]  # fmt: skip
    quality = {"command": "c", "commits": [], "seeds": [0, 1], "val_images": 4, "backbone": "b", "weights": "w",
               "eval": "e", "classes": ["background", "cat"], "rows": rows, "summary": summarize(rows)}  # fmt: skip
    # means 12.5 / 25 / 12 / 45; sample std of two values a, b is |a - b| / sqrt(2)
    assert "| toco | 12.5 ± 0.0 | 25.0 ± 7.1 | 12.0 ± 2.8 | 45.0 ± 7.1 |" in render_table(quality)


def test_single_seed_difference_is_labelled():
    rows = [dict(r, runs={"0": r["runs"]["0"]}) for r in ROWS]
    s = summarize(rows)
    assert s["better"]["diff"]["seg"]["verdict"] == "1 seed" and s["toco"]["seg"]["n"] == 1


def test_a_tie_on_one_seed_is_noise_and_a_zero_reference_is_no_crash():
    base = {"0": {"seg": 0.5}, "1": {"seg": 0.5}}
    assert paired_diff({"0": {"seg": 0.6}, "1": {"seg": 0.5}}, base, "seg")["verdict"] == "noise"
    assert paired_diff({"0": {"seg": 0.6}, "1": {"seg": 0.7}}, base, "seg")["verdict"] == ""
    rows = [dict(ROWS[0]), dict(ROWS[3], runs={"0": _run(0.0), "1": _run(0.68)})]
    assert summarize(rows)["toco"]["ratio"]["mean"] == pytest.approx(0.5)  # seed 0's ratio is NaN, left out


def test_rows_are_named_apart(tmp_path):
    other = tmp_path / "toco_lr2.yaml"
    other.write_text(f"_base_: {Path('configs/bench/toco.yaml').resolve()}\noptim: {{lr: 2.0e-4}}\n")
    rows = q.plan_rows(["configs/bench/toco.yaml", str(other)], [], ablate=False, reference="none")
    assert [r["label"] for r in rows] == ["toco", "toco_lr2"] and rows[1]["baseline"] == "toco"
    with pytest.raises(ConfigError, match="named like an earlier one"):
        q.plan_rows(["configs/bench/toco.yaml", "configs/bench/toco.yaml"], [], ablate=False, reference="none")
    with pytest.raises(ConfigError, match="like a recipe row"):
        q.plan_rows(["configs/bench/toco.yaml", "configs/bench/fully_supervised.yaml"], [], ablate=False,
                    reference="configs/bench/fully_supervised.yaml")  # fmt: skip


def test_ablation_switches_exactly_one_module_off_per_row():
    rows = q.plan_rows(["configs/bench/rca.yaml", "configs/bench/cpf_cte.yaml"], [], ablate=True, reference="none")
    full = {"rca": {"region_memory", "region_contrast", "region_aggregation"}, "cpf_cte": {"cf_bilstm", "class_tokens"}}
    assert [r["label"] for r in rows] == ["rca", "rca -region_contrast", "rca -region_aggregation", "cpf_cte",
                                          "cpf_cte -cf_bilstm", "cpf_cte -class_tokens"]  # fmt: skip
    for r in rows:
        mods = set(q.row_config(r, [], 0).method.modules)
        base = r["baseline"] or r["label"]
        if r["baseline"] is None:
            assert mods == full[base]
        else:  # the row's own module is the one missing, and only it
            assert full[base] - mods == {r["label"].split(" -")[1]} and mods < full[base]


def test_reference_must_share_backbone_and_crop(tmp_path):
    ref = tmp_path / "ref.yaml"
    ref.write_text(
        f"_base_: {Path('configs/bench/toco.yaml').resolve()}\nmethod: {{name: fully_supervised}}\n"
        "data: {crop_size: 64}\n"
    )
    with pytest.raises(ConfigError, match="data.crop_size"):
        q.bench_quality(["configs/bench/toco.yaml"], str(tmp_path / "out"), 1, reference=str(ref))


def test_data_detection(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "tags.csv").write_text("image,tags\n")
    assert q.data_overrides(str(folder), "configs/bench/toco.yaml")[:2] == ["--data.dataset", "folder"]
    split = tmp_path / "s"
    for sub in ("train", "val"):
        (split / sub).mkdir(parents=True)
        (split / sub / "tags.csv").write_text("image,tags\n")
    over = q.data_overrides(str(split), "configs/bench/toco.yaml")
    assert over[over.index("--data.val_root") + 1] == str(split / "val")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="junk: not a dataset"):
        q.data_overrides(str(junk), "configs/bench/toco.yaml")


def test_an_empty_data_folder_is_filled_only_by_a_dataset_that_can_make_itself(tmp_path, monkeypatch):
    """The demo recipe's dataset writes itself into an empty --data folder; a VOC recipe's cannot, and is refused."""
    import wsss.data.synthetic as synthetic

    made = []
    monkeypatch.setattr(synthetic, "generate", lambda root: made.append(root))
    assert q.data_overrides(str(tmp_path / "new"), "configs/bench/toco.yaml") == ["--data.root", str(tmp_path / "new")]
    assert made == [tmp_path / "new"]
    with pytest.raises(DataError, match="empty: not a dataset"):
        q.data_overrides(str(tmp_path / "empty"), "configs/toco/voc_vit-b.yaml")
    assert len(made) == 1


def test_bench_quality_refuses_a_folder_with_a_users_table(tmp_path, tiny_args, capsys):
    (tmp_path / "table.md").write_text("my notes\n")
    args = ["bench", "quality", "--config", "configs/bench/toco.yaml", "--seeds", "1", "--out", str(tmp_path),
            *tiny_args, "--train.max_iters", "2"]  # fmt: skip
    assert main(args) == 2
    assert "table.md exists" in capsys.readouterr().err and not (tmp_path / "runs").exists()
    assert (tmp_path / "table.md").read_text() == "my notes\n"


def test_bench_quality_trains_skips_and_resumes(tmp_path, tiny_args, monkeypatch, capsys):
    out = tmp_path / "bench"
    args = ["bench", "quality", "--config", "configs/bench/toco.yaml", "--seeds", "2", "--out", str(out), *tiny_args,
            "--train.max_iters", "3", "--method.seg_warmup", "1"]  # fmt: skip
    assert main(args) == 0
    quality = json.loads((out / "quality.json").read_text())
    assert [r["label"] for r in quality["rows"]] == ["toco", "fully_supervised"]
    assert all(set(r["runs"]) == {"0", "1"} for r in quality["rows"])
    for r in quality["rows"]:
        for seed, run in r["runs"].items():
            res = json.loads((out / "runs" / r["label"] / f"seed{seed}" / "final_eval.json").read_text())
            assert run["seg"] == res["seg"]["miou"]
            assert run["seg_fg"] == res["seg"]["fg_share"]["pred"] and run["gt_fg"] == res["seg"]["fg_share"]["gt"]
            pseudo = res.get("pseudo", {}).get("fg_share", {})  # none for the reference
            assert (run.get("pseudo_fg"), run.get("pseudo_band")) == (pseudo.get("pred"), pseudo.get("band"))
    toco = quality["rows"][0]["runs"]
    assert toco["0"]["seg"] != toco["1"]["seg"] or toco["0"]["pseudo"] != toco["1"]["pseudo"]  # two seeds ran
    assert (out / "table.md").read_text().startswith("# Quality benchmark")
    assert (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Stopped after one checkpoint: that run resumes; the finished ones are read, not retrained.
    (out / "runs" / "toco" / "seed1" / "final_eval.json").unlink()
    trained = []
    from wsss.engine.trainer import Trainer

    real_fit = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self, *a, **k: trained.append(self.run_dir) or real_fit(self, *a, **k))
    assert main(args) == 0
    assert trained == [out / "runs" / "toco" / "seed1"]
    again = json.loads((out / "quality.json").read_text())
    assert again["rows"][1]["runs"] == quality["rows"][1]["runs"]
    # A run that died before its first checkpoint is moved aside and trained again; nothing is deleted.
    run = out / "runs" / "fully_supervised" / "seed0"
    (run / "final_eval.json").unlink()
    (run / "checkpoints" / "last.pt").unlink()
    trained.clear()
    assert main(args) == 0
    assert trained == [run] and (run / "final_eval.json").is_file()
    assert len(list(run.parent.glob("seed0.interrupted-*"))) == 1
    # A finished run of another config is never reused or overwritten.
    capsys.readouterr()
    assert main([*args, "--optim.lr", "1e-3"]) == 2
    assert "holds a finished run of another config" in capsys.readouterr().err


def test_bench_speed_times_every_recipe_in_one_table(tmp_path, tiny_args, capsys):
    out = tmp_path / "speed"
    args = ["bench", "speed", "--config", "configs/bench/toco.yaml", "--config", "configs/bench/fully_supervised.yaml",
            "--repeats", "1", "--warmup", "0", "--out", str(out), *tiny_args]  # fmt: skip
    assert main(args) == 0
    res = json.loads((out / "speed.json").read_text())
    toco, fs = res["rows"]
    assert toco["method"] == "toco" and fs["method"] == "fully_supervised" and toco["ratio_to_first"] == 1.0
    assert fs["ratio_to_first"] == pytest.approx(fs["step_s"] / toco["step_s"])
    assert toco["ratio_to_bare"] == pytest.approx(toco["step_s"] / res["bare_fwd_bwd_s"])
    assert toco["peak_mem_mb"] > 100 and set(res["crf_images_per_s"]) == {"dense", "torch"}
    assert res["threads"] == torch.get_num_threads() and res["cpu_budget"] >= 1
    assert "| toco |" in (out / "speed.md").read_text() and "| fully_supervised |" in capsys.readouterr().out
    # every recipe must share the backbone, crop and batch
    other = tmp_path / "other.yaml"
    other.write_text(f"_base_: {Path('configs/bench/toco.yaml').resolve()}\ntrain: {{batch_size: 4}}\n")
    i = tiny_args.index("--train.batch_size")
    with pytest.raises(ConfigError, match="train.batch_size = 4 but configs/bench/toco.yaml has 8"):
        bench_speed(["configs/bench/toco.yaml", str(other)], tiny_args[:i] + tiny_args[i + 2 :])


def test_peak_memory_is_the_childs_own_not_its_large_parents(tiny_args):
    # Linux carries a forking parent's resident size into the child's ru_maxrss: with that bug every
    # recipe reported the bench process's 4140 MB. A parent holding 1 GiB must not show in the child.
    big = torch.ones(2**28)  # 1 GiB, written, so resident
    parent_rss = proc_status_mb("VmRSS")
    child = peak_memory_mb("configs/bench/toco.yaml", tiny_args, steps=1)["rss"]
    del big
    assert 50 < child < parent_rss - 700
