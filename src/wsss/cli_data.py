"""The ``wsss`` subcommands about data and what is registered: ``data demo|check``, ``prepare DATASET``
and ``list``. Heavy imports stay inside."""

from __future__ import annotations

import dataclasses
import json


def cmd_data(args, extra: list[str]) -> int:
    """`wsss data demo|check`: generate the demo data, or report every problem of a dataset root."""
    if args.data_cmd == "demo":
        from wsss.data.synthetic import DemoConfig, generate

        cfg = DemoConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig)})
        root = generate(args.out, cfg)
        print(f"demo data ({cfg.n_train} train, {cfg.n_val} val, {cfg.size}px) written to {root}")
        return 0
    from wsss.data.check import check_root

    _dataset(args.dataset, allow_auto=True)
    problems = check_root(args.root, args.dataset)
    for sev, msg in problems:
        print(f"{sev}: {msg}")
    n_err = sum(s == "error" for s, _ in problems)
    print(f"{n_err} errors, {sum(s == 'warning' for s, _ in problems)} warnings")
    return 1 if n_err else 0


def _dataset(name: str, allow_auto: bool = False):
    """The registered dataset ``name`` (None for ``auto``); a UsageError naming the known ones otherwise."""
    from wsss.cli import UsageError
    from wsss.registry import DATASETS

    if allow_auto and name == "auto":
        return None
    try:
        return DATASETS.get(name)
    except KeyError as e:
        raise UsageError(e.args[0]) from None


def cmd_prepare(args, extra: list[str]) -> int:
    """`wsss prepare DATASET ROOT`: the dataset's one-off conversion of a downloaded root."""
    from pathlib import Path

    from wsss.cli import UsageError
    from wsss.data.spec import DatasetSpec
    from wsss.registry import DATASETS

    spec = _dataset(args.dataset)
    if not (isinstance(spec, DatasetSpec) and spec.can_prepare()):
        able = [n for n, e in sorted(DATASETS.entries().items()) if isinstance(e, DatasetSpec) and e.can_prepare()]
        raise UsageError(f"dataset '{args.dataset}' has no `wsss prepare` conversion; datasets with one: "
                         f"{', '.join(able)}")  # fmt: skip
    print(json.dumps(spec.prepare(Path(args.root), args.sbd, args.overwrite)))
    return 0


def cmd_list(args, extra: list[str]) -> int:
    """`wsss list`: registered methods, modules, datasets or backbones, or the packaged recipes."""
    from wsss.registry import BACKBONES, DATASETS, METHODS, MODULES

    if args.what == "backbones":
        import timm

        def rows(patterns) -> str:
            tags: dict[str, list[str]] = {}
            for full in timm.list_models(patterns, pretrained=True):
                arch, _, tag = full.partition(".")
                tags.setdefault(arch, []).append(tag or "default")
            names = timm.list_models(patterns)
            width = max(len(n) for n in names)
            marks = {n: f"pretrained: {', '.join(tags[n])}" if n in tags else "no pretrained weights" for n in names}
            return "\n".join(f"{n:<{width}}  {marks[n]}" for n in names)

        print("backbone wrappers (model.arch; auto picks by the timm model's family):", ", ".join(BACKBONES.names()))
        print("pretrained weights come from timm's hub (model.weights timm: needs internet once, then its cache) or")
        print("a local file (model.weights PATH or WSSS_WEIGHTS), which must fit the backbone exactly")
        print("timm ViTs usable as model.backbone (NAME or NAME.TAG):")
        print(rows(["vit_*", "deit_*"]))
        print("timm CNNs usable as model.backbone (arch cnn; output stride via model.output_stride):")
        print(rows(["resnet*", "wide_resnet*", "resnext*"]))
        return 0
    if args.what == "recipes":
        from wsss.recipes import describe, recipe_dir, recipe_names

        names = recipe_names()
        width = max(len(n) for n in names)
        print(f"packaged recipes (--config NAME; files in {recipe_dir()}):")
        print("\n".join(f"{n:<{width}}  {describe(n)}" for n in names))
        return 0
    if args.what == "modules":
        from wsss.methods.pipeline import describe_modules

        table = describe_modules()
        cols = ("name", "method", "losses", "warmup", "needs", "uses")
        widths = {c: max(len(c), *(len(r[c]) for r in table)) for c in cols[:-1]}
        print("  ".join(c.ljust(widths.get(c, 0)) for c in cols))
        for r in table:
            uses = r["uses"] + ("; ViT only" if r["vit_only"] else "")
            print("  ".join(r[c].ljust(widths[c]) for c in cols[:-1]) + "  " + uses)
        print("\nA module is configured under its name (method.<name>.<key>) and switched on by method.modules.")
        return 0
    reg = {"methods": METHODS, "modules": MODULES, "datasets": DATASETS}[args.what]
    for name in reg.names():
        obj = reg.get(name)
        doc = (obj.__doc__ or "").strip().splitlines()
        needs = getattr(obj, "needs", ())
        print(f"{name:<20} {doc[0] if doc else ''}" + (f" [needs: {', '.join(needs)}]" if needs else ""))
    return 0
