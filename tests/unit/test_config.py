import pytest

from wsss.config import ConfigError, dump_config, load_config, resolve


def test_typo_rejected_with_key_name(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.max_iter' \(did you mean 'train.max_iters'\?\)"):
        load_config(None, ["--train.max_iter", "5"])
    with pytest.raises(ConfigError, match=r"'method.high_thres'"):
        load_config(None, ["--method.high_thres=0.5"])
    with pytest.raises(ConfigError, match="must be int"):
        load_config(None, ["--train.max_iters", "many"])
    with pytest.raises(ConfigError, match="unknown method 'tocoo'"):
        load_config(None, ["--method.name", "tocoo"])


def test_overrides_types_and_roundtrip(tmp_path):
    cfg = load_config("configs/toco/coco_vit-b.yaml", ["--train.max_iters", "7", "--eval.scales", "[1.0, 0.5]"])
    assert cfg.train.max_iters == 7 and cfg.eval.scales == (1.0, 0.5)
    assert load_config(None, ["--optim.lr", "2e-4"]).optim.lr == 2e-4  # YAML 1.1 alone would give a string
    assert cfg.method.high_thre == 0.65 and cfg.method.low_thre == 0.25  # base recipe merged under COCO's
    assert cfg.data.dataset == "coco" and cfg.data.crop_size == 448
    import yaml

    assert resolve(yaml.safe_load(dump_config(cfg))) == cfg


def test_base_with_other_method_replaces_method_section():
    cfg = load_config("configs/bench/fully_supervised.yaml")
    assert cfg.method_name == "fully_supervised" and cfg.data.crop_size == 112


def test_recipe_of_an_extending_method_inherits_the_base_method_settings():
    for path, mods in (("configs/cpf_cte/coco_vit-b.yaml", ("cf_bilstm", "class_tokens")),
                       ("configs/stcl/voc_vit-b.yaml", ("temporal_contrast",))):  # fmt: skip
        cfg = load_config(path)
        base = load_config(path.replace("cpf_cte", "toco").replace("stcl", "toco"))
        assert cfg.method.modules == mods
        assert cfg.method.seg_warmup == base.method.seg_warmup and cfg.method.high_thre == base.method.high_thre
        assert cfg.data == base.data and cfg.optim == base.optim
    assert load_config("configs/cpf_cte/coco_vit-b.yaml").method.high_thre == 0.65
    assert load_config("configs/stcl/voc_vit-b.yaml").method.temporal_contrast.size == 256


def test_the_cam_background_threshold_has_one_home(tmp_path, caplog):
    """eval.bkg_thre is the only CAM scoring threshold (the toco family's own copy used to win over it, so
    --eval.bkg_thre did nothing); a run directory's method.bkg_thre of that time is read as eval.bkg_thre, or,
    when the file also sets eval.bkg_thre, ignored with a warning that says how to score as before."""
    from wsss.build import build_method
    from wsss.evaluation.evaluators import build_evaluators

    cfg = load_config("configs/toco/coco_vit-b.yaml", ["--eval.bkg_thre", "0.3"])
    assert cfg.eval.bkg_thre == 0.3 and not hasattr(cfg.method, "bkg_thre")
    assert load_config("configs/toco/coco_vit-b.yaml").eval.bkg_thre == 0.45
    cfg = load_config(None, ["--model.backbone", "test_vit", "--model.weights", "none", "--eval.bkg_thre", "0.3"])
    from wsss.data.classes import ClassSpec

    cam = [e for e in build_evaluators(build_method(cfg, ClassSpec(("a", "b"))), ClassSpec(("a", "b")), cfg.eval,
                                       ("cam",))]  # fmt: skip
    assert [e.bkg for e in cam] == [0.3]
    old = tmp_path / "config.yaml"
    old.write_text("method:\n  name: toco\n  bkg_thre: 0.45\n")
    assert load_config(old).eval.bkg_thre == 0.45
    old.write_text("method:\n  name: toco\n  bkg_thre: 0.45\neval:\n  bkg_thre: 0.5\n")
    assert load_config(old).eval.bkg_thre == 0.5
    assert "method.bkg_thre' (0.45) is no longer read" in caplog.text and "--eval.bkg_thre 0.45" in caplog.text


def test_a_datasets_settings_are_its_own_section(tmp_path, caplog):
    import yaml

    cfg = load_config(None, ["--data.dataset", "folder", "--data.folder.holdout", "0.3"])
    assert (cfg.data.options.holdout, cfg.data.options.no_background) == (0.3, False)
    written = yaml.safe_load(dump_config(cfg))["data"]
    assert written["folder"] == {"holdout": 0.3, "no_background": False} and "options" not in written
    (tmp_path / "config.yaml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "config.yaml") == cfg
    # VOC has no settings of its own: nothing is written for it, and a section for it is refused
    voc = load_config(None, [])
    assert voc.data.options is None and "voc" not in yaml.safe_load(dump_config(voc))["data"]
    with pytest.raises(ConfigError, match=r"^config key 'data.voc.holdout': the voc dataset has no settings$"):
        load_config(None, ["--data.voc.holdout", "0.2"])
    with pytest.raises(ConfigError, match=r"'data.folder' configures the folder dataset, but data.dataset is 'voc'"):
        load_config(None, ["--data.folder.holdout", "0.2"])
    with pytest.raises(
        ConfigError, match=r"unknown config key 'data.folder.holdot' \(did you mean 'data.folder.holdout'"
    ):
        load_config(None, ["--data.dataset", "folder", "--data.folder.holdot", "0.2"])


def test_run_directories_with_the_old_data_keys_still_load():
    # config.yaml of runs made before the folder settings moved under data.folder: every run wrote both keys
    old_folder = resolve({"data": {"dataset": "folder", "holdout": 0.25, "no_background": True}})
    assert (old_folder.data.options.holdout, old_folder.data.options.no_background) == (0.25, True)
    old_voc = resolve({"data": {"dataset": "voc", "holdout": 0.1, "no_background": False}})
    assert old_voc.data.options is None
    with pytest.raises(ConfigError, match=r"'data.holdout' is a setting of one dataset .*voc dataset has no such"):
        resolve({"data": {"dataset": "voc", "holdout": 0.3}})


def test_renamed_module_keys_load_under_their_new_names(tmp_path, caplog):
    """A module's one loss weight is ``w`` and thresholds end in ``_thre``; recipes and run directories that use
    the old names (w_mem, w_cls, low, high) still load, with a warning; both names at once is an error."""
    import yaml

    cfg = load_config("configs/stcl/voc_vit-b.yaml", ["--method.temporal_contrast.size", "8"])
    assert cfg.method.temporal_contrast.w == 0.1 and not hasattr(cfg.method.temporal_contrast, "w_mem")
    old = tmp_path / "config.yaml"
    old.write_text(
        "method:\n  name: toco\n  modules: [temporal_contrast, class_tokens, ema_teacher, uncertain_masking]\n"
        "  temporal_contrast:\n    w_mem: 0.3\n  class_tokens:\n    w_cls: 0.7\n"
        "  uncertain_masking:\n    low: 0.15\n    high: 0.8\n"
    )  # fmt: skip
    m = load_config(old).method
    assert (m.temporal_contrast.w, m.class_tokens.w) == (0.3, 0.7)
    assert (m.uncertain_masking.low_thre, m.uncertain_masking.high_thre) == (0.15, 0.8)
    assert "config key 'method.uncertain_masking.low' is now 'method.uncertain_masking.low_thre'" in caplog.text
    text = dump_config(load_config(old))  # what a resumed run writes: the new names only, the same config
    assert "w_mem" not in text and "low:" not in text and "low_thre: 0.15" in text
    assert resolve(yaml.safe_load(text)) == load_config(old)
    with pytest.raises(ConfigError, match=r"'method.temporal_contrast.w_mem' and 'method.temporal_contrast.w' are "
                                          r"one setting .* give only 'method.temporal_contrast.w'"):  # fmt: skip
        load_config("configs/stcl/voc_vit-b.yaml", ["--method.temporal_contrast.w_mem", "0.2"])
