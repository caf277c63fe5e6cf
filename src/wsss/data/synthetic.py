"""The built-in demo dataset: a deterministic generator of VOC-layout data that poses WSSS's problems.

Each of the five classes has a small, saturated, highly discriminative *part* (a cat's orange head, a
car's wheels, a boat's yellow flag, a flower's magenta petals, a person's skin-coloured head) and a
larger *body* in muted colours shared with the background clutter, told apart only by shape and a
faint class texture. A CAM trained on tags alone fires on the parts and misses much of the bodies,
as on real photos. Boats always sit on water (a background context that co-occurs with the class);
other images get water rarely. Backgrounds are smooth noise plus clutter blobs in body colours.
Objects vary in size (``min_scale``..``max_scale`` of the image side), 1..``max_objects`` per image,
and may overlap. Masks are palette PNGs with a 1-pixel void (255) band on class borders, as in VOC.

Knobs (``wsss data demo --help``): ``n_train``, ``n_val``, ``size``, ``max_objects``, ``min_scale``,
``max_scale``, ``clutter`` (blobs per image), ``water_rate`` (water in non-boat images), ``seed``.
The same knobs and seed give byte-identical files.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from wsss.data.classes import ClassSpec, voc_palette
from wsss.data.io import write_mask
from wsss.utils.files import atomic_write

DEMO_CLASSES = ("boat", "car", "cat", "flower", "person")
BODY_COLORS = np.array(
    [[120, 90, 70], [110, 110, 120], [130, 115, 95], [90, 120, 80], [100, 95, 130], [125, 100, 105]],
    dtype=np.float32,
)  # muted; shared by bodies and background clutter
PART_COLORS = {
    "boat": (250, 220, 30),
    "car": (20, 20, 20),
    "cat": (240, 130, 20),
    "flower": (230, 40, 200),
    "person": (240, 190, 160),
}


@dataclass(frozen=True)
class DemoConfig:
    """Generator knobs; see the module docstring."""

    n_train: int = 400
    n_val: int = 100
    size: int = 112
    max_objects: int = 3
    min_scale: float = 0.3
    max_scale: float = 0.6
    clutter: int = 6
    water_rate: float = 0.1
    seed: int = 0


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    g = rng.random((cells, cells)).astype(np.float32)
    im = Image.fromarray((g * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(im, dtype=np.float32) / 255.0


def _background(rng: np.random.Generator, cfg: DemoConfig) -> np.ndarray:
    S = cfg.size
    base = BODY_COLORS[rng.integers(len(BODY_COLORS))] + rng.normal(0, 15, 3)
    n = _smooth_noise(rng, S, 6)[..., None] - 0.5
    img = base + 70 * n + rng.normal(0, 8, (S, S, 3))
    layer = Image.new("L", (S, S))
    d = ImageDraw.Draw(layer)
    for k in range(cfg.clutter):
        x, y = rng.integers(0, S, 2)
        r = int(rng.integers(S // 16, S // 5))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([x - r, y - r // 2, x + r, y + r // 2], fill=k + 1)
    lab = np.asarray(layer)
    for k in range(cfg.clutter):
        col = BODY_COLORS[rng.integers(len(BODY_COLORS))] + rng.normal(0, 20, 3)
        img[lab == k + 1] = col + rng.normal(0, 10, (int((lab == k + 1).sum()), 3))
    return img


def _water(rng: np.random.Generator, img: np.ndarray, top: int) -> None:
    S = img.shape[0]
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    waves = 0.5 + 0.5 * np.sin(xx / rng.uniform(3, 6) + 3 * np.sin(yy / 7.0))
    water = np.stack([40 + 30 * waves, 90 + 40 * waves, 170 + 40 * waves], -1)
    img[top:] = water[top:] + rng.normal(0, 6, (S - top, S, 3))


def _texture(rng: np.random.Generator, S: int, cls: int) -> np.ndarray:
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    ang = cls * np.pi / len(DEMO_CLASSES)
    stripes = np.sin((np.cos(ang) * xx + np.sin(ang) * yy) / 2.5)
    return 14 * stripes[..., None]


def _draw_object(cls_name: str, cx: float, cy: float, s: float, body: ImageDraw.ImageDraw, part: ImageDraw.ImageDraw):
    """Draw the body and the discriminative part of one object on two 'L' layers (value 255)."""
    if cls_name == "boat":
        body.polygon([(cx - s / 2, cy - s * 0.12), (cx + s / 2, cy - s * 0.12), (cx + s * 0.35, cy + s * 0.18),
                      (cx - s * 0.35, cy + s * 0.18)], fill=255)  # fmt: skip
        body.rectangle([cx - s * 0.02, cy - s * 0.55, cx + s * 0.02, cy - s * 0.12], fill=255)
        part.polygon(
            [(cx + s * 0.02, cy - s * 0.55), (cx + s * 0.2, cy - s * 0.47), (cx + s * 0.02, cy - s * 0.39)], fill=255
        )
    elif cls_name == "car":
        body.rounded_rectangle([cx - s / 2, cy - s * 0.12, cx + s / 2, cy + s * 0.15], radius=s * 0.06, fill=255)
        body.polygon([(cx - s * 0.28, cy - s * 0.12), (cx - s * 0.16, cy - s * 0.34), (cx + s * 0.18, cy - s * 0.34),
                      (cx + s * 0.3, cy - s * 0.12)], fill=255)  # fmt: skip
        r = s * 0.1
        for wx in (cx - s * 0.3, cx + s * 0.3):
            part.ellipse([wx - r, cy + s * 0.15 - r, wx + r, cy + s * 0.15 + r], fill=255)
    elif cls_name == "cat":
        body.ellipse([cx - s / 2, cy - s * 0.22, cx + s * 0.35, cy + s * 0.22], fill=255)
        body.rectangle([cx - s * 0.45, cy + s * 0.1, cx + s * 0.3, cy + s * 0.35], fill=255)
        r = s * 0.14
        part.ellipse([cx + s * 0.3 - r, cy - s * 0.22 - r, cx + s * 0.3 + r, cy - s * 0.22 + r], fill=255)
    elif cls_name == "flower":
        body.rectangle([cx - s * 0.03, cy - s * 0.25, cx + s * 0.03, cy + s * 0.5], fill=255)
        body.ellipse([cx - s * 0.35, cy, cx, cy + s * 0.15], fill=255)
        body.ellipse([cx, cy + s * 0.12, cx + s * 0.35, cy + s * 0.27], fill=255)
        r = s * 0.13
        part.ellipse([cx - r, cy - s * 0.35 - r, cx + r, cy - s * 0.35 + r], fill=255)
    elif cls_name == "person":
        body.rectangle([cx - s * 0.16, cy - s * 0.3, cx + s * 0.16, cy + s * 0.12], fill=255)
        body.rectangle([cx - s * 0.15, cy + s * 0.12, cx - s * 0.03, cy + s * 0.5], fill=255)
        body.rectangle([cx + s * 0.03, cy + s * 0.12, cx + s * 0.15, cy + s * 0.5], fill=255)
        r = s * 0.1
        part.ellipse([cx - r, cy - s * 0.42 - r, cx + r, cy - s * 0.42 + r], fill=255)


def _void_border(mask: np.ndarray) -> np.ndarray:
    m = mask.astype(np.int32)
    edge = np.zeros_like(m, dtype=bool)
    edge[:, 1:] |= m[:, 1:] != m[:, :-1]
    edge[1:, :] |= m[1:, :] != m[:-1, :]
    out = mask.copy()
    out[edge] = 255
    return out


def make_sample(rng: np.random.Generator, cfg: DemoConfig) -> tuple[np.ndarray, np.ndarray]:
    """One (image (S, S, 3) uint8, mask (S, S) uint8) pair."""
    S = cfg.size
    img = _background(rng, cfg)
    n_obj = int(rng.integers(1, cfg.max_objects + 1))
    classes = [int(c) for c in rng.integers(0, len(DEMO_CLASSES), n_obj)]
    water_top = None
    if 0 in classes or rng.random() < cfg.water_rate:
        water_top = int(rng.integers(S // 3, S // 2))
        _water(rng, img, water_top)
    mask = np.zeros((S, S), dtype=np.uint8)
    for c in classes:
        name = DEMO_CLASSES[c]
        s = float(rng.uniform(cfg.min_scale, cfg.max_scale)) * S
        cx = float(rng.uniform(0.1 * S + s / 3, 0.9 * S - s / 3))
        if name == "boat" and water_top is not None:
            cy = float(rng.uniform(water_top + s * 0.05, min(S - s * 0.2, water_top + S * 0.25)))
        else:
            cy = float(rng.uniform(0.1 * S + s / 3, 0.9 * S - s / 3))
        bl, pl = Image.new("L", (S, S)), Image.new("L", (S, S))
        _draw_object(name, cx, cy, s, ImageDraw.Draw(bl), ImageDraw.Draw(pl))
        body, part = np.asarray(bl) > 0, np.asarray(pl) > 0
        col = BODY_COLORS[rng.integers(len(BODY_COLORS))] + rng.normal(0, 12, 3)
        tex = _texture(rng, S, c)
        img[body] = (col + tex + rng.normal(0, 8, (S, S, 3)))[body]
        pc = np.array(PART_COLORS[name], dtype=np.float32)
        img[part] = (pc + rng.normal(0, 10, (S, S, 3)))[part]
        mask[body | part] = c + 1
    return np.clip(img, 0, 255).astype(np.uint8), _void_border(mask)


def generate(out: str | Path, cfg: DemoConfig = DemoConfig()) -> Path:
    """Write the demo dataset in VOC layout under ``out``; returns the root. Deterministic by seed."""
    root = Path(out)
    spec = ClassSpec(DEMO_CLASSES)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    labels: dict[str, list[str]] = {}
    splits = {"train": cfg.n_train, "val": cfg.n_val}
    for split_i, (split, n) in enumerate(splits.items()):
        rng = np.random.default_rng([cfg.seed, split_i])
        names = []
        for i in range(n):
            name = f"{split}_{i:05d}"
            img, mask = make_sample(rng, cfg)
            (root / "JPEGImages").mkdir(exist_ok=True)
            Image.fromarray(img).save(root / "JPEGImages" / f"{name}.jpg", quality=92)
            write_mask(root / "SegmentationClass" / f"{name}.png", mask, voc_palette().flatten().tolist())
            labels[name] = spec.tags_from_mask(mask)
            names.append(name)
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    atomic_write(root / "cls_labels.json", lambda p: Path(p).write_text(json.dumps(labels, indent=0)))
    (root / "classes.txt").write_text("\n".join(DEMO_CLASSES) + "\n")
    (root / "demo_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    return root
