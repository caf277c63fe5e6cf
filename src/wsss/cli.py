"""The ``wsss`` command. Heavy imports live inside the subcommands so ``wsss --help`` stays fast."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from wsss.utils.progress import progress_reporter

log = logging.getLogger("wsss")


class UsageError(ValueError):
    """A command given options that do not go together (exit code 2, like argparse's own usage errors)."""


def _setup_logging() -> None:
    import os

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")  # fmt: skip


def cmd_train(args, extra: list[str]) -> int:
    """`wsss train`: train a recipe, or resume a run directory."""
    from wsss.config import dump_config, load_config

    if args.resume:
        if args.config or args.overwrite or args.run_dir:
            raise UsageError("wsss train: --resume continues a run with its own config.yaml; --config, --run-dir "
                             "and --overwrite do not apply (overrides such as --train.max_iters N do)")  # fmt: skip
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"{run_dir / 'config.yaml'}: no run to resume here")
        cfg = load_config(run_dir / "config.yaml", extra)
    else:
        if not args.config:
            raise UsageError("wsss train: --config is required (or --resume RUN_DIR)")
        cfg = load_config(args.config, extra)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    from wsss.engine.trainer import Trainer, default_run_dir
    from wsss.utils import dist

    if not args.resume:
        run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(cfg)
    trainer = Trainer(cfg, run_dir, resume=bool(args.resume), overwrite=args.overwrite)
    if args.resume and extra:  # overrides given at resume (e.g. a longer schedule) are part of the record
        if dist.is_main():
            from wsss.utils.files import atomic_write

            text = dump_config(cfg)
            atomic_write(run_dir / "config.yaml", lambda p: Path(p).write_text(text))
    log.info("run directory: %s", run_dir)
    trainer.fit(stop_at=args.stop_at)
    dist.cleanup()
    return 0


def cmd_evaluate(args, extra: list[str]) -> int:
    """`wsss evaluate`: score a run or checkpoint on a split; writes JSON and prints a table."""
    from wsss.api import load_run
    from wsss.build import build_eval_dataset
    from wsss.data.io import DataError
    from wsss.data.loader import eval_loader
    from wsss.evaluation.evaluators import format_table, run_evaluation
    from wsss.utils import dist

    cfg, method, classes, device, run_dir = load_run(args.target, extra)
    from wsss.data.io import dumps_results, ensure_writable
    from wsss.utils.files import atomic_write

    out = Path(args.out) if args.out else run_dir / f"eval_{args.split or cfg.eval.split or cfg.data.val_split}.json"
    ensure_writable(out.parent)  # before the evaluation, not after it
    device = dist.init_from_env(device)  # under torchrun each rank scores its shard; matrices are summed
    method.to(device)
    split = args.split or cfg.eval.split or cfg.data.val_split
    ds = build_eval_dataset(cfg, split)
    if args.max_images:
        ds.items = ds.items[: args.max_images]
    if tuple(ds.classes.names) != tuple(classes.names):
        where = cfg.data.val_root or cfg.data.root or cfg.data.dataset
        raise DataError(f"{where}: dataset classes {ds.classes.names} differ from the checkpoint's {classes.names}")
    loader = eval_loader(ds, cfg.eval.batch_size, dist.rank(), dist.world_size(), cfg.data.num_workers)
    progress = progress_reporter(f"evaluate {split}")
    which = tuple(args.which.split(",")) if ds.load_masks else ("tags",)  # no masks: the tag level only
    res = run_evaluation(method, loader, classes, cfg.eval, device, which, progress)
    report = {"split": split, "images": len(ds), "scales": list(cfg.eval.scales), "flip": cfg.eval.flip,
              "reduce": cfg.eval.reduce, "crf": cfg.eval.crf, "window": cfg.eval.window, "overlap": cfg.eval.overlap,
              "classes": list(classes.seg_names), "results": res}  # fmt: skip
    if not dist.is_main():
        dist.cleanup()
        return 0
    atomic_write(out, lambda p: Path(p).write_text(dumps_results(report)))
    dist.cleanup()
    print(
        f"{cfg.method_name} on {split} ({len(ds)} images, scales {list(cfg.eval.scales)}, flip {cfg.eval.flip}, "
        f"CRF {cfg.eval.crf})"
    )
    print(format_table(res, classes))
    print(f"written: {out}")
    return 0


def cmd_predict(args, extra: list[str]) -> int:
    """`wsss predict`: palette PNG masks for image files/directories or a dataset split."""
    from wsss.api import load_run
    from wsss.config import split_overrides
    from wsss.data.loader import eval_loader
    from wsss.evaluation.predict import PredictOptions, check_outputs, image_dataset, write_predictions

    # argparse stops filling `inputs` at the first override: images after `--eval.crf dense` land in extra
    pairs, more_inputs = split_overrides(extra)
    args.inputs += more_inputs
    cfg, method, classes, device, run_dir = load_run(args.target, [f"--{k}={v}" for k, v in pairs])
    if args.sliding and not cfg.eval.window:  # the training crop's side, unless --eval.window names one
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, window=cfg.data.crop_size))
    if bool(args.inputs) == bool(args.split):
        raise UsageError("wsss predict: give image files/directories or --split, not both or neither")
    if args.split:
        from wsss.build import build_dataset

        ds = build_dataset(cfg, args.split, train=False, load_masks=False)
    else:
        ds = image_dataset(args.inputs, classes)
    out = Path(args.out) if args.out else run_dir / "predictions" / (args.split or "images")
    opts = PredictOptions(args.overlay, args.save_probs, args.save_cams, args.max_side, args.overwrite)
    if opts.save_cams and not method.has_cams:
        raise UsageError(f"wsss predict: --save-cams: {cfg.method_name} has no CAM head")
    if opts.max_side < 0:
        raise UsageError(f"wsss predict: --max-side {opts.max_side}: give a positive side in pixels (0: off)")
    earlier = check_outputs(ds.items, out, opts)  # before any work: never replace an input or another's file
    progress = progress_reporter("predict")
    meta = {"run": str(run_dir), "method": cfg.method_name, "scales": list(cfg.eval.scales), "flip": cfg.eval.flip,
            "reduce": cfg.eval.reduce, "crf": cfg.eval.crf, "max_side": opts.max_side, "window": cfg.eval.window,
            "overlap": cfg.eval.overlap}  # fmt: skip
    recs = write_predictions(method, eval_loader(ds, 1, 0, 1, cfg.data.num_workers), classes, cfg.eval, device,
                             out, progress, opts, meta, earlier)  # fmt: skip
    print(f"{len(recs)} masks ({', '.join(classes.seg_names)}; scales {list(cfg.eval.scales)}, CRF {cfg.eval.crf}) "
          f"in {out}; classes found per image: {out / 'predictions.json'}")  # fmt: skip
    return 0


def cmd_bench(args, extra: list[str]) -> int:
    """`wsss bench step|speed|quality|modules`: step time against the bare backbone; every recipe's speed;
    multi-seed quality table (``modules``: its ablation mode, each module off in turn)."""
    if args.bench_cmd in ("quality", "modules"):
        import shlex

        from wsss.bench.quality import bench_quality

        command = "wsss " + " ".join(shlex.quote(a) for a in args.argv)
        bench_quality(args.config, args.out, args.seeds, args.data, extra, ablate=args.bench_cmd == "modules" or
                      args.ablate, reference=args.reference, command=command)  # fmt: skip
        return 0
    if args.bench_cmd == "speed":
        import shlex

        from wsss.bench.speed import bench_speed, default_configs, write_speed

        res = bench_speed(args.config or default_configs(), extra, args.repeats, args.warmup, not args.no_memory)
        print(write_speed(res, args.out, "wsss " + " ".join(shlex.quote(a) for a in args.argv)))
        return 0
    from wsss.bench.step import bench_step
    from wsss.config import load_config

    cfg = load_config(args.config, extra)
    res = bench_step(cfg, repeats=args.repeats, warmup=args.warmup)
    print(json.dumps(res, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``wsss`` command."""
    from wsss.cli_data import cmd_data, cmd_list, cmd_prepare
    from wsss.cli_stage import cmd_export, cmd_pseudo_labels, cmd_report

    p = argparse.ArgumentParser(prog="wsss", description="Weakly supervised semantic segmentation.")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error, not only its one line")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a method (dotted overrides such as --train.max_iters 100 follow)")
    t.add_argument("--config", help="recipe: a YAML file, or a packaged recipe's name (demo/toco; wsss list recipes)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    t.add_argument("--run-dir", help="output directory (default: train.out_dir/<method>-<dataset>-<time>)")
    t.add_argument("--overwrite", action="store_true", help="replace an earlier run's files in --run-dir (without "
                   "it such a directory is refused; --resume continues it)")  # fmt: skip
    t.add_argument("--print-config", "--print_config", dest="print_config", action="store_true",
                   help="print the resolved config and exit")  # fmt: skip
    t.add_argument(
        "--stop-at",
        type=int,
        default=0,
        metavar="ITER",
        help="stop after this iteration, schedule unchanged; continue later with --resume",
    )
    t.set_defaults(fn=cmd_train)
    e = sub.add_parser("evaluate", help="evaluate a run directory or checkpoint")
    e.add_argument("target", help="run directory or checkpoint file")
    e.add_argument("--split", default="", help="split to evaluate (default: the config's val split)")
    e.add_argument(
        "--which",
        default="seg,cam,pseudo",
        help="comma list of seg, cam, pseudo, tags (a split without masks: tags only)",
    )
    e.add_argument("--max-images", type=int, default=0)
    e.add_argument("--out", default="", help="JSON output (default: RUN_DIR/eval_<split>.json)")
    e.set_defaults(fn=cmd_evaluate)
    pp = sub.add_parser("predict", help="write palette PNG masks for images or a split (--eval.* overrides follow)")
    pp.add_argument("target", help="run directory or checkpoint file")
    pp.add_argument("inputs", nargs="*", help="image files or directories of images")
    pp.add_argument("--split", default="", help="predict a split of the run's dataset instead")
    pp.add_argument("--out", default="", help="output directory (default: RUN_DIR/predictions/<split|images>)")
    pp.add_argument("--overlay", action="store_true", help="also NAME_overlay.png: image | coloured mask, legend")
    pp.add_argument("--save-probs", action="store_true", help="also NAME_probs.npy: (K, H, W) float16 probabilities")
    pp.add_argument("--save-cams", action="store_true", help="also NAME_cams.npy: (C, H, W) float16 CAMs")
    pp.add_argument("--max-side", type=int, default=0, metavar="PX",
                    help="predict large images downscaled to this longer side; masks stay at full size")  # fmt: skip
    pp.add_argument("--sliding", action="store_true", help="predict in overlapping windows of the training crop's "
                    "size (eval.window; --eval.window PX for another side, --eval.overlap the fraction)")  # fmt: skip
    pp.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier predict into --out")
    pp.set_defaults(fn=cmd_predict)
    pl = sub.add_parser("pseudo-labels", help="write a weak run's pseudo labels of a split (--method.* overrides "
                        "follow, e.g. --method.cam_scales [1.0,0.5,1.5])")  # fmt: skip
    pl.add_argument("target", help="run directory or checkpoint file")
    pl.add_argument("--split", default="", help="split of the run's dataset (default: its train split)")
    pl.add_argument("--out", default="", help="output directory (default: RUN_DIR/pseudo_labels/<split>)")
    pl.add_argument("--crf", default="none", help="sharpen with a dense CRF: none | torch | dense ([crf] extra)")
    pl.add_argument("--overwrite", action="store_true", help="replace the labels of an earlier run into --out")
    pl.set_defaults(fn=cmd_pseudo_labels)
    ex = sub.add_parser("export", help="export the inference network: safetensors, onnx or torchscript")
    ex.add_argument("target", help="run directory or checkpoint file")
    ex.add_argument("--format", required=True, choices=["safetensors", "onnx", "torchscript"])
    ex.add_argument("--out", default="", help="output file (default: RUN_DIR/export.<suffix>)")
    ex.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="example image size to trace "
                    "(default: the crop size); TorchScript accepts only this size")  # fmt: skip
    ex.set_defaults(fn=cmd_export)
    rp = sub.add_parser("report", help="an HTML page of a run: curves, per-class scores, confusion, samples")
    rp.add_argument("target", help="run directory or checkpoint file")
    rp.add_argument("--split", default="", help="split to score and sample (default: the run's val split)")
    rp.add_argument("--out", default="", help="output directory (default: RUN_DIR/report)")
    rp.add_argument("--samples", type=int, default=6, help="images of the split in the sample grid")
    rp.add_argument("--overwrite", action="store_true", help="replace an earlier report's files in --out")
    rp.set_defaults(fn=cmd_report)
    d = sub.add_parser("data", help="demo data and data checks")
    dsub = d.add_subparsers(dest="data_cmd", required=True)
    dm = dsub.add_parser("demo", help="generate the built-in demo dataset (VOC layout)")
    dm.add_argument("--out", required=True)
    from wsss.data.synthetic import DemoConfig  # numpy + Pillow only: keeps --help fast

    for f in dataclasses.fields(DemoConfig):  # every generator knob, defaults from one place
        dm.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    dc = dsub.add_parser("check", help="report every problem of a dataset root")
    dc.add_argument("root")
    dc.add_argument("--dataset", default="auto", help="a registered dataset (`wsss list datasets`); auto: by the files")
    d.set_defaults(fn=cmd_data)
    pr = sub.add_parser("prepare", help="one-off dataset conversion")
    pr.add_argument("dataset", help="a registered dataset with a conversion: voc (VOC 2012 + SBD), coco (COCO 2014)")
    pr.add_argument("root")
    pr.add_argument("--sbd", metavar="DIR", help="voc: SBD's benchmark_RELEASE, to build SegmentationClassAug")
    pr.add_argument("--overwrite", action="store_true", help="voc: replace an existing train_aug.txt, cls_labels.json")
    pr.set_defaults(fn=cmd_prepare)
    ls = sub.add_parser("list", help="list registered methods, modules, datasets, backbones or packaged recipes")
    ls.add_argument("what", choices=["methods", "modules", "datasets", "backbones", "recipes"])
    ls.set_defaults(fn=cmd_list)
    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench_cmd", required=True)
    bs = bsub.add_parser("step", help="median training-step time vs the bare backbone forward+backward")
    bs.add_argument("--config", required=True)
    bs.add_argument("--repeats", type=int, default=5)
    bs.add_argument("--warmup", type=int, default=2)
    sp = bsub.add_parser("speed", help="step time, inference and CRF throughput, peak memory of every recipe")
    sp.add_argument("--config", action="append", help="recipe (repeat; default: every configs/bench recipe)")
    sp.add_argument("--repeats", type=int, default=5)
    sp.add_argument("--warmup", type=int, default=2)
    sp.add_argument("--out", default="runs/bench_speed")
    sp.add_argument("--no-memory", action="store_true", help="skip the per-recipe peak-memory processes")
    for name, text in (
        ("quality", "train recipes and a fully supervised reference over seeds; mIoU table"),
        ("modules", "quality benchmark in ablation mode: each recipe, then each module off"),
    ):
        bq = bsub.add_parser(name, help=text)
        bq.add_argument("--config", action="append", required=True, help="recipe (repeat for several)")
        bq.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 for every row (default 3)")
        bq.add_argument("--data", default="", help="dataset directory: folder (tags.csv), VOC layout, or demo "
                        "data (generated when missing)")  # fmt: skip
        bq.add_argument("--out", default=f"runs/bench_{name}")
        bq.add_argument("--reference", default="", help="reference recipe (default: the first recipe as "
                        "fully_supervised; 'none': no reference)")  # fmt: skip
        if name == "quality":
            bq.add_argument("--ablate", action="store_true", help="also each module off in turn")
        else:
            bq.set_defaults(ablate=True)
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``wsss`` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded by the benchmarks
    _setup_logging()
    if extra and args.cmd not in ("train", "evaluate", "predict", "pseudo-labels", "export", "report", "bench"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from wsss.config import ConfigError
    from wsss.data.io import DataError
    from wsss.engine.checkpoint import CheckpointError
    from wsss.engine.guard import TrainingError
    from wsss.engine.rundir import RunDirError

    # exit codes: 2 for a wrong use of the command or recipe (as argparse), 1 for everything the data, the
    # files or the training itself got wrong
    try:
        return args.fn(args, extra)
    except (ConfigError, UsageError) as e:
        if args.debug:
            raise
        print(f"wsss: error: {one_line(e).removeprefix('wsss: error: ')}", file=sys.stderr)
        return 2
    except (DataError, CheckpointError, RunDirError, TrainingError, FileNotFoundError) as e:
        if args.debug:
            raise
        print(f"wsss: error: {one_line(e)}", file=sys.stderr)
        return 1
    except PermissionError as e:  # e.g. an output folder that is read-only: the file and the reason, no traceback
        if args.debug:
            raise
        print(f"wsss: error: {e.filename or 'output'}: {e.strerror or e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # out of memory outside the trainer (evaluate, predict): the settings that help
        from wsss.engine.guard import inference_out_of_memory_advice, is_out_of_memory

        if args.debug or not is_out_of_memory(e):
            raise
        device = "cpu" if "DefaultCPUAllocator" in str(e) else "gpu"
        if args.cmd in ("evaluate", "predict", "pseudo-labels", "report"):
            print(f"wsss: error: {inference_out_of_memory_advice(device)}", file=sys.stderr)
        else:
            print(f"wsss: error: out of {device.upper()} memory in `wsss {args.cmd}` ({one_line(e)[:200]})",
                  file=sys.stderr)  # fmt: skip
        return 1
    except BrokenPipeError:  # `wsss list backbones | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        return 0


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line; errors re-raised from DataLoader workers carry the worker's
    traceback in their message, whose last line is the original ``Type: message``."""
    last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    for prefix in ("wsss.data.io.DataError: ", "wsss.config.ConfigError: ", "FileNotFoundError: ",
                   "wsss.engine.checkpoint.CheckpointError: "):  # fmt: skip
        last = last.removeprefix(prefix)
    return last


if __name__ == "__main__":
    sys.exit(main())
