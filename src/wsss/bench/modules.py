"""``wsss bench modules``: each recipe in full, and with each of its modules switched off in turn.

Every row is trained from the same seed, data, backbone and schedule (the recipe's), then scored on
the val split: CAM, pseudo-label and seg mIoU. Rows come from ``method.modules`` alone, so any recipe
(built-in or plug-in, stacked or not) gets its ablation without code that knows its name. Results go
to ``OUT/summary.json`` and ``OUT/table.md``; the command line that produced them is written there too.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
import time
from pathlib import Path

from wsss.config import load_config
from wsss.data.io import atomic_write
from wsss.demo import ensure_demo_data, fmt_miou, train_row

log = logging.getLogger("wsss")


def variants(config: str, overrides: list[str], ablate: bool = True) -> list[tuple[str, list[str]]]:
    """[(label, extra overrides)]: the recipe itself, then (``ablate``) one row per module with that module off.

    The recipe's row is labelled with its method's name when it runs that method's own modules, else
    with the config file's stem (a stack of modules from several methods).

    A module another listed module needs (RCA's region memory) has no row of its own: switching it off
    switches its dependents off too, which the recipe's base method (all modules off) already shows.
    """
    from wsss.registry import METHODS, MODULES

    cfg = load_config(config, overrides)
    mods = list(getattr(cfg.method, "modules", ()))
    needed = {d for m in mods for d in MODULES.get(m).needs}
    own = list(getattr(METHODS.get(cfg.method_name).Config(), "modules", ()))
    name = cfg.method_name if mods == own else Path(config).stem
    rows = [(name, [])]
    for m in mods if ablate else ():
        if m in needed:
            continue
        rest = ", ".join(x for x in mods if x != m)
        rows.append((f"{name} -{m}", ["--method.modules", f"[{rest}]"]))
    return rows


def bench_modules(configs: list[str], out: str, overrides: list[str], data: str = "", ablate: bool = True) -> dict:
    """Train and score every variant of every recipe in ``configs``; returns the summary dict."""
    out_dir = Path(out)
    if data:
        ensure_demo_data(Path(data))
        overrides = ["--data.root", data, *overrides]
    rows, t0 = {}, time.time()
    for config in configs:
        for label, extra in variants(config, overrides, ablate):
            if label in rows:
                continue
            cfg = load_config(config, [*overrides, *extra])
            log.info("bench modules: %s (modules %s)", label, list(getattr(cfg.method, "modules", ())))
            row, trainer = train_row(cfg, out_dir / label.replace(" -", "-no-"))
            rows[label] = row | {"modules": list(getattr(cfg.method, "modules", ())), "config": config}
            weights, backbone = trainer.method.backbone.weights_source, cfg.model.backbone
            val = len(trainer.val_ds) if trainer.val_ds is not None else 0
    cmd = "wsss bench modules " + " ".join(shlex.quote(a) for a in sys.argv[3:]) if len(sys.argv) > 3 else ""
    lines = [f"val split ({val} images); backbone {backbone}; weights {weights}; single scale, no CRF",
             "", "| run | modules | CAM | pseudo | seg | min |", "|---|---|---|---|---|---|"]  # fmt: skip
    for label, r in rows.items():
        cells = [fmt_miou(r.get(k)).strip() for k in ("cam", "pseudo", "seg")]
        lines.append(f"| {label} | {', '.join(r['modules']) or '-'} | {' | '.join(cells)} | {r['minutes']:.1f} |")
    lines.append(f"\ntotal {(time.time() - t0) / 60:.1f} min" + (f"; command: `{cmd}`" if cmd else ""))
    table = "\n".join(lines)
    summary = {"rows": rows, "weights": weights, "backbone": backbone, "command": cmd}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "summary.json", lambda p: Path(p).write_text(json.dumps(summary, indent=2)))
    atomic_write(out_dir / "table.md", lambda p: Path(p).write_text(table + "\n"))
    print(table)
    return summary
