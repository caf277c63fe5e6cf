"""The ``wsss`` subcommands that turn a trained run into files for what comes next: ``pseudo-labels``
(a second stage's training labels), ``export`` (a deployable network) and ``report`` (an HTML page to
judge the run). Heavy imports stay inside."""

from __future__ import annotations

from pathlib import Path

from wsss.utils.progress import progress_reporter


def cmd_pseudo_labels(args, extra: list[str]) -> int:
    """`wsss pseudo-labels`: a weak run's pseudo labels of a split as palette PNGs (255 uncertain) + JSON."""
    from wsss.api import load_run
    from wsss.build import build_dataset
    from wsss.cli import UsageError
    from wsss.data.io import DataError
    from wsss.data.loader import eval_loader
    from wsss.evaluation.pseudo_export import check_label_outputs, export_pseudo_labels, method_settings

    cfg, method, classes, device, run_dir = load_run(args.target, extra)
    if not method.has_cams:
        raise UsageError(f"wsss pseudo-labels: {cfg.method_name} trains on masks and makes no pseudo labels")
    if args.crf != "none":
        from wsss.registry import CRF

        try:
            CRF.get(args.crf)  # an unknown backend fails here, before any work
        except KeyError as e:
            raise UsageError(f"wsss pseudo-labels: --crf: {e.args[0]}") from None
    split = args.split or cfg.data.train_split
    ds = build_dataset(cfg, split, train=False, load_masks=False)
    out = Path(args.out) if args.out else run_dir / "pseudo_labels" / split
    earlier = check_label_outputs(ds.items, out, args.overwrite)
    meta = {"run": str(run_dir.resolve()), "method": cfg.method_name, "split": split,
            "method_config": method_settings(cfg.method)}  # fmt: skip
    if earlier:  # one folder, one provenance: the index's settings must describe every label in it
        import json

        now = json.loads(json.dumps({**meta, "crf": args.crf}))  # tuples as JSON lists, as written
        if any(earlier.get(k) != v for k, v in now.items()):
            raise DataError(f"wsss pseudo-labels: {out} holds labels of another run or other settings; "
                             "give another --out")  # fmt: skip
    progress = progress_reporter(f"pseudo labels {split}")
    loader = eval_loader(ds, cfg.eval.batch_size, 0, 1, cfg.data.num_workers)
    recs = export_pseudo_labels(method, loader, classes, device, out, args.crf, progress, meta,
                                earlier.get("images", []))  # fmt: skip
    share = sum(r["labelled"] for r in recs) / max(len(recs), 1)
    print(f"{len(recs)} pseudo labels of split {split} ({100 * share:.1f}% of pixels labelled, 255 elsewhere; "
          f"CRF {args.crf}) in {out}; train on them with --data.mask_dir {out}")  # fmt: skip
    return 0


def cmd_export(args, extra: list[str]) -> int:
    """`wsss export`: the run's inference network (seg path) as safetensors, ONNX or TorchScript."""
    from wsss import export as ex
    from wsss.api import load_run
    from wsss.cli import UsageError
    from wsss.data.io import DataError

    cfg, method, classes, _, run_dir = load_run(args.target, extra, device="cpu")
    out = Path(args.out) if args.out else run_dir / f"export{ex.SUFFIX[args.format]}"
    if out.exists() or out.is_symlink():  # never replace a file this command did not just write
        raise DataError(f"{out}: exists; give another --out or remove it")
    size = tuple(args.size) if args.size else (cfg.data.crop_size, cfg.data.crop_size)
    if min(size) < 1:
        raise UsageError(f"wsss export: --size {size[0]} {size[1]}: give a positive height and width")
    if args.format == "safetensors":
        ex.export_safetensors(method, cfg, classes, out)
    elif args.format == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401  (torch.onnx's exporter)
        except ImportError as e:
            raise SystemExit(f"wsss export: --format onnx needs {e.name}: pip install 'wsss[export]'") from None
        dynamic = ex.export_onnx(method, out, size, ex.metadata(cfg, classes))
    else:
        any_size = ex.export_torchscript(method, out, size, ex.metadata(cfg, classes))
    if args.format == "onnx":
        fixed = [d for d in ("batch", "height", "width") if d not in dynamic]
        shape = f"dynamic {', '.join(dynamic) or 'nothing'}" + (f"; fixed {', '.join(fixed)}" if fixed else "")
    elif args.format == "torchscript" and any_size:
        shape = "any batch and image size (checked against PyTorch at a second size)"
    else:
        shape = f"ONLY image size {size[0]}x{size[1]} (the trace does not hold at other sizes)"
    print(f"{out}: {args.format}, RGB (B, 3, H, W) in [0, 1] -> logits (B, {classes.K}, H, W) "
          f"({', '.join(classes.seg_names)})" + ("" if args.format == "safetensors" else f"; {shape}"))  # fmt: skip
    return 0


def cmd_report(args, extra: list[str]) -> int:
    """`wsss report`: one HTML page with training curves, per-class scores, confusion matrix and samples."""
    from wsss.report import build_report

    page = build_report(args.target, args.out or None, args.split, args.samples, args.overwrite, extra,
                        progress_reporter("evaluate"))  # fmt: skip
    print(f"report: {page}")
    return 0
