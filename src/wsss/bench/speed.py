"""``wsss bench speed``: training-step time, inference and CRF throughput and peak memory, per recipe.

Every recipe (``--config``, repeatable; by default every ``configs/bench`` recipe) is built in one
process at one backbone, batch and crop (the first recipe's: the others must share them), and timed on
the same random batch as ``wsss bench step``: repeat by repeat, each method's step and the bare
backbone forward+backward run in turn, so that all see the same machine conditions. Reported per
recipe: median step (s) and its ratio to the first recipe's and to the bare forward+backward;
inference images per second single-scale and at ToCo's multi-scale protocol (scales 1, 0.5, 1.5 with
flip); peak memory (max RSS on CPU, max allocated on CUDA), each measured in a fresh process per recipe
so that one recipe's peak is not another's. Dense-CRF images per second for each backend, once, on one
prediction of the first recipe. The intra-op thread count and the CPU budget it was chosen from are
recorded beside the figures.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from wsss.bench.step import _time, bare_pass, build_for_bench, train_once
from wsss.config import ConfigError, get_dotted, load_config
from wsss.utils.files import atomic_write

MULTI_SCALE = (1.0, 0.5, 1.5)


def default_configs() -> list[str]:
    """Every packaged ``bench/`` recipe, toco first (the reference excluded: it has no CAM pipeline to time)."""
    from wsss.recipes import recipe_dir

    paths = sorted((recipe_dir() / "bench").glob("*.yaml"))
    if not paths:
        raise ConfigError(f"bench speed: no --config given and no recipes in {recipe_dir() / 'bench'}")
    first = [p for p in paths if p.stem == "toco"]  # the baseline the ratios are taken to, when present
    return [str(p) for p in first + [p for p in paths if p not in first and not p.stem.startswith("_")]]


def peak_memory_mb(config: str, overrides: list[str], steps: int = 3) -> dict:
    """{"rss": max RSS (MB), "cuda": max allocated on the GPU (MB) or None} of a fresh process that builds
    ``config``'s method and runs ``steps`` training steps: one recipe's peak, not the others' too."""
    code = "import sys, json; from wsss.bench.speed import run_steps; print(json.dumps(run_steps(*sys.argv[1:])))"
    out = subprocess.run([sys.executable, "-c", code, config, json.dumps(overrides), str(steps)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_steps(config: str, overrides: str, steps: str) -> dict:
    """The memory probe's child: build ``config``'s method, run ``steps`` training steps, report its peaks."""
    cfg = load_config(config, json.loads(overrides))
    method, opt, batch, device = build_for_bench(cfg)
    for _ in range(int(steps)):
        train_once(method, opt, batch, cfg.train.max_iters - 1)
    cuda = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"rss": peak_rss_mb(), "cuda": cuda}


def proc_status_mb(field: str) -> float | None:
    """A memory line of ``/proc/self/status`` (``VmHWM``, ``VmRSS``, ...) in MB; None without procfs."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """This process's peak resident memory (MB): VmHWM of its own address space.

    Not ``getrusage``'s ``ru_maxrss``: Linux carries the forking parent's resident size into it across
    ``execve``, so every child of a large parent reports at least the parent's size (measured: 4140 MB
    for every recipe, the parent's, until this was changed)."""
    hwm = proc_status_mb("VmHWM")
    if hwm is not None:
        return hwm
    import resource  # no procfs (macOS: bytes, and no inheritance problem there)

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


@torch.no_grad()
def images_per_second(
    method, images: torch.Tensor, scales: tuple[float, ...], flip: bool, device, repeats: int
) -> float:
    """Seg inference throughput (images / s, median of ``repeats``) at ``scales`` (+ flip)."""
    from wsss.evaluation.inference import multi_scale_seg

    method.eval()
    multi_scale_seg(method, images, scales, flip)
    times = [_time(lambda: multi_scale_seg(method, images, scales, flip), device)[0] for _ in range(repeats)]
    method.train()
    return images.shape[0] / statistics.median(times)


def crf_images_per_second(method, images: torch.Tensor, device, repeats: int) -> dict:
    """{backend: images / s} of each CRF backend that can run here, on the seg softmax of ``images[:1]``."""
    from wsss.cam.crf import apply_crf
    from wsss.data.transforms import denormalize
    from wsss.evaluation.inference import multi_scale_seg

    x = images[:1]
    with torch.no_grad():
        method.eval()
        probs = torch.softmax(multi_scale_seg(method, x), 1)
        method.train()
    rgb = denormalize(x.float()) * 255.0
    out = {}
    for name in ("dense", "torch"):
        try:
            apply_crf(name, probs, rgb)
        except ConfigError:  # backend not installed (the [crf] extra)
            continue
        times = [_time(lambda n=name: apply_crf(n, probs, rgb), device)[0] for _ in range(repeats)]
        out[name] = 1.0 / statistics.median(times)
    return out


def bench_speed(configs: list[str], overrides: list[str], repeats: int = 5, warmup: int = 2,
                memory: bool = True) -> dict:  # fmt: skip
    """Time every recipe in ``configs``; returns {"rows": [...], "crf_images_per_s", "threads", ...}."""
    from wsss.engine.threads import cpu_budget

    cfgs = [load_config(c, overrides) for c in configs]
    for c, cfg in zip(configs[1:], cfgs[1:]):
        for key in ("model.backbone", "data.crop_size", "train.batch_size"):
            a, b = get_dotted(cfg, key), get_dotted(cfgs[0], key)
            if a != b:
                raise ConfigError(f"bench speed: {c} has {key} = {a!r} but {configs[0]} has {b!r}")
    built = [build_for_bench(cfg) for cfg in cfgs]
    device = built[0][3]
    steps: list[list[float]] = [[] for _ in cfgs]
    bares: list[float] = []

    def step(i: int):
        method, opt, batch, _ = built[i]
        train_once(method, opt, batch, cfgs[i].train.max_iters - 1)

    def bare():
        bare_pass(built[0][0], built[0][2])

    for r in range(warmup + repeats):  # interleaved: every recipe and the bare pass in each round
        for i in range(len(cfgs)):
            t = _time(lambda i=i: step(i), device)[0]
            if r >= warmup:
                steps[i].append(t)
        t = _time(bare, device)[0]
        if r >= warmup:
            bares.append(t)
    bare_s = statistics.median(bares)
    images = built[0][2]["image"]
    rows = []
    for i, (config, cfg) in enumerate(zip(configs, cfgs)):
        method = built[i][0]
        s = statistics.median(steps[i])
        row = {
            "config": config, "method": cfg.method_name, "modules": list(getattr(cfg.method, "modules", ())),
            "step_s": s, "ratio_to_first": s / statistics.median(steps[0]), "ratio_to_bare": s / bare_s,
            "seg_images_per_s": images_per_second(method, images, (1.0,), False, device, repeats),
            "seg_ms_flip_images_per_s": images_per_second(method, images, MULTI_SCALE, True, device, repeats),
        }  # fmt: skip
        if memory:
            mem = peak_memory_mb(config, overrides)
            row["peak_mem_mb"] = mem["cuda"] if device.type == "cuda" else mem["rss"]
        rows.append(row)
    budget = cpu_budget()
    return {
        "rows": rows, "bare_fwd_bwd_s": bare_s, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "cpu_budget": budget, "backbone": cfgs[0].model.backbone,
        "batch": cfgs[0].train.batch_size, "crop": cfgs[0].data.crop_size, "repeats": repeats, "warmup": warmup,
        "crf_images_per_s": crf_images_per_second(built[0][0], images, device, repeats),
    }  # fmt: skip


def render_speed(res: dict, command: str = "") -> str:
    """Markdown table of :func:`bench_speed`'s result."""
    mem = "peak RSS (MB)" if res["device"] == "cpu" else "max allocated (MB)"
    lines = [
        f"Device {res['device_name']}; {res['threads']} intra-op threads (CPU budget {res['cpu_budget']}); "
        f"{res['backbone']}, batch {res['batch']}, crop {res['crop']}; median of {res['repeats']} interleaved "
        f"repeats after {res['warmup']} warm-up; bare forward+backward {res['bare_fwd_bwd_s']:.3f} s."
        + (f" Command: `{command}`" if command else ""),
        "",
        f"| recipe | step (s) | / {Path(res['rows'][0]['config']).stem} | / bare | seg img/s | MS+flip img/s | {mem} |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        m = r.get("peak_mem_mb", math.nan)
        lines.append(f"| {Path(r['config']).stem} | {r['step_s']:.3f} | {r['ratio_to_first']:.2f} | "
                     f"{r['ratio_to_bare']:.2f} | {r['seg_images_per_s']:.1f} | {r['seg_ms_flip_images_per_s']:.1f} | "
                     f"{'-' if math.isnan(m) else f'{m:.0f}'} |")  # fmt: skip
    crf = ", ".join(f"{k} {v:.2f} img/s" for k, v in res["crf_images_per_s"].items()) or "no backend"
    lines += ["", f"Dense CRF on one {res['crop']} px image (10 iterations): {crf}."]
    return "\n".join(lines)


def write_speed(res: dict, out: str, command: str = "") -> str:
    """speed.json and speed.md under ``out`` (atomic); returns the table."""
    table = render_speed(res, command)
    atomic_write(Path(out) / "speed.json", lambda p: Path(p).write_text(json.dumps(res | {"command": command},
                                                                                    indent=2)))  # fmt: skip
    atomic_write(Path(out) / "speed.md", lambda p: Path(p).write_text(table + "\n"))
    return table
