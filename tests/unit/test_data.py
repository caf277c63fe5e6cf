import numpy as np
import pytest
import torch
from PIL import Image

from wsss.config import load_config
from wsss.data.check import check_root
from wsss.data.classes import voc_palette
from wsss.data.io import DataError, write_mask
from wsss.data.loader import StreamSampler
from wsss.data.synthetic import DemoConfig, make_sample
from wsss.data.transforms import TrainTransform


def _folder(root, rows, size=(8, 8)):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for fname, _ in rows:
        Image.new("RGB", size, (10, 20, 30)).save(root / "images" / fname)
    (root / "tags.csv").write_text("image,tags\n" + "".join(f"{f},{t}\n" for f, t in rows))
    return root


def test_folder_dataset_train_and_val_roots(tmp_path):
    from wsss.build import build_dataset

    tr = _folder(tmp_path / "tr", [("a.jpg", "dog;person"), ("b.jpg", "cat")])
    va = _folder(tmp_path / "va", [("c.jpg", "dog")])
    write_mask(va / "masks" / "c.png", np.full((8, 8), 2, np.uint8), voc_palette().flatten().tolist())
    cfg = load_config(None, ["--data.dataset", "folder", "--data.train_root", str(tr), "--data.val_root", str(va)])
    ds = build_dataset(cfg, cfg.data.train_split, train=False, load_masks=False)
    assert ds.classes.names == ("cat", "dog", "person")
    s = ds[0]
    assert s["tags"].tolist() == [0, 1, 1] and "mask" not in s
    val = build_dataset(cfg, cfg.data.val_split, train=False, load_masks=True)
    assert val[0]["mask"].unique().tolist() == [2]


def test_folder_errors_name_file(tmp_path):
    from wsss.build import build_dataset

    root = _folder(tmp_path / "f", [("a.jpg", "")])
    cfg = load_config(None, ["--data.dataset", "folder", "--data.root", str(root)])
    with pytest.raises(DataError, match=r"a.jpg: image has no tags"):
        build_dataset(cfg, "train", train=False, load_masks=False)
    with pytest.raises(DataError, match=r"nowhere: data root does not exist"):
        build_dataset(load_config(None, ["--data.dataset", "folder", "--data.root", str(tmp_path / "nowhere")]),
                      "train", train=False, load_masks=False)  # fmt: skip


def test_data_check_reports_everything_at_once(tmp_path):
    rows = [("a.jpg", "dog"), ("b.jpg", "dog"), ("c.png", "dog;dog"), ("d.jpg", "")]
    root = _folder(tmp_path / "f", rows, size=(16, 16))
    (root / "classes.txt").write_text("dog\ncat\n")
    with open(root / "tags.csv", "a") as f:
        f.write("e.jpg,horse\n")
    Image.new("RGB", (15, 40)).save(root / "images" / "e.jpg")
    (root / "images" / "a.jpg").write_bytes(b"garbage")
    Image.new("RGBA", (16, 16)).save(root / "images" / "c.png")
    write_mask(root / "masks" / "b.png", np.zeros((5, 5), np.uint8), voc_palette().flatten().tolist())
    msgs = [f"{s}: {m}" for s, m in check_root(root)]
    text = "\n".join(msgs)
    assert "a.jpg: corrupt or unreadable image" in text
    assert "b.png: mask is 5x5 but its image is 16x16" in text
    assert "warning" in text and "c.png: image has an alpha channel" in text
    assert "d.jpg: image has no tags" in text
    assert "e.jpg: unknown tag 'horse'" in text
    assert "warning: " + str(root / "images" / "e.jpg") + ": tiny image (40x15)" in text  # 15 px < 16; 16 is fine
    assert "info: images per class: dog 3" in msgs  # a repeated tag counts its image once
    assert "warning: 1 of 2 classes are on no image and cannot be learned: cat" in msgs
    assert len(msgs) == 8


def test_data_check_counts_and_prints_only_errors_and_warnings(tmp_path, capsys):
    from wsss.cli import main

    root = _folder(tmp_path / "f", [("a.jpg", "dog"), ("b.jpg", "dog;cat")], size=(16, 16))
    assert main(["data", "check", str(root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["info: images per class: cat 1, dog 2", "0 errors, 0 warnings"]


def test_train_transform_padding_is_ignored_and_deterministic():
    img = np.full((10, 12, 3), 200, np.uint8)
    mask = np.ones((10, 12), np.uint8)
    tf = TrainTransform(16, (1.0, 1.0), hflip=False, color_jitter=0.0)
    x, m, valid = tf(img, mask, np.random.default_rng(0))
    assert x.shape == (3, 16, 16) and valid.sum() == 120
    assert (m[~valid] == 255).all() and (m[valid] == 1).all()
    x2, _, _ = tf(img, mask, np.random.default_rng(0))
    assert torch.equal(x, x2)


def test_stream_sampler_resume_and_shards_cover_single_stream():
    def take(s, n):
        it = iter(s)
        return [next(it) for _ in range(n)]

    single = take(StreamSampler(5, seed=3, micro=2), 12)
    assert sorted(i for i, _ in single[:5]) == [0, 1, 2, 3, 4]  # a permutation per epoch
    assert take(StreamSampler(5, seed=3, micro=2, start=6), 6) == single[6:]
    r0 = take(StreamSampler(5, seed=3, micro=1, rank=0, world=2), 6)
    r1 = take(StreamSampler(5, seed=3, micro=1, rank=1, world=2), 6)
    assert [x for pair in zip(r0, r1) for x in pair] == single


def test_demo_generator_is_deterministic_and_objects_have_parts():
    cfg = DemoConfig(size=64)
    a = make_sample(np.random.default_rng(1), cfg)
    b = make_sample(np.random.default_rng(1), cfg)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert set(np.unique(a[1])) - {0, 255}  # at least one object
    assert (a[1] == 255).any()  # void band on borders


def test_gaussian_blur_grey_and_solarise_by_hand():
    from wsss.data.transforms import gaussian_blur, grayscale
    from wsss.data.views import random_resized_view

    x = torch.zeros(2, 1, 9, 9)
    x[:, 0, 4, 4] = 1.0  # an impulse: the blurred image is the kernel itself
    y = gaussian_blur(x, torch.tensor([1.0, 0.5]))
    g = torch.exp(-(torch.arange(-3.0, 4.0) ** 2) / 2)
    g = g / g.sum()
    assert torch.allclose(y[0, 0, 1:8, 1:8], g[:, None] * g[None], atol=1e-6)  # sigma 1: radius 3
    assert float(y[1, 0, 4, 4]) > float(y[0, 0, 4, 4]) and torch.allclose(y.sum((2, 3)), torch.ones(2, 1))
    flat = torch.full((1, 3, 6, 6), 0.3)
    assert torch.allclose(gaussian_blur(flat, torch.tensor([2.0])), flat)  # reflect padding keeps a flat image
    rgb = torch.tensor([1.0, 0.5, 0.0])[None, :, None, None].expand(1, 3, 2, 2)
    assert torch.allclose(grayscale(rgb), torch.full((1, 3, 2, 2), 0.299 + 0.5 * 0.587))
    # Probability 1 switches each on for every image, 0 leaves the view (and its random stream) as without.
    img = (torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) - 0.45) / 0.226
    base = random_resized_view(img, torch.Generator().manual_seed(1), jitter=0.0).image
    same = random_resized_view(img, torch.Generator().manual_seed(1), jitter=0.0, p_gray=0.0, p_blur=0.0).image
    assert torch.equal(base, same)
    grey = random_resized_view(img, torch.Generator().manual_seed(1), jitter=0.0, p_gray=1.0).image
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    grey_rgb = grey * std + mean
    assert torch.allclose(grey_rgb[:, 0], grey_rgb[:, 2], atol=1e-5) and not torch.allclose(base, grey)
    # Blur: the drawn radius of each chosen image (after the 8 per-image draws), the others untouched.
    g = torch.Generator().manual_seed(1)
    u = torch.rand(2, 8, generator=g)
    sigma = 0.1 + 1.9 * torch.rand(2, generator=g)
    blurred = random_resized_view(img, torch.Generator().manual_seed(1), jitter=0.0, p_blur=1.0).image
    want = (gaussian_blur(base * std + mean, sigma) - mean) / std
    assert torch.allclose(blurred, want, atol=1e-5)
    p = float((u[0, 7] + u[1, 7]) / 2)  # exactly one of the two images is chosen
    part = random_resized_view(img, torch.Generator().manual_seed(1), jitter=0.0, p_blur=p).image
    on = u[:, 7] < p
    assert on.sum() == 1 and torch.allclose(part[~on], base[~on], atol=1e-5)
    assert (part[on] - base[on]).abs().amax() > 1e-2
    sol = random_resized_view(img, torch.Generator().manual_seed(1), jitter=0.0, p_solarize=1.0).image * std + mean
    b = (base * std + mean).clamp(0, 1)
    assert torch.allclose(sol, torch.where(b >= 0.5, 1 - b, b), atol=1e-5)


def test_train_transform_grey_and_blur_switch_on_and_default_stream_is_unchanged():
    img = (np.random.default_rng(0).random((20, 24, 3)) * 255).astype(np.uint8)
    plain = TrainTransform(16, (1.0, 1.0), True, 0.0)(img, None, np.random.default_rng(3))[0]
    zero = TrainTransform(16, (1.0, 1.0), True, 0.0, 0.0, 0.0)(img, None, np.random.default_rng(3))[0]
    assert torch.equal(plain, zero)
    grey = TrainTransform(16, (1.0, 1.0), True, 0.0, p_gray=1.0)(img, None, np.random.default_rng(3))[0]
    assert torch.allclose(grey[0] * 0.229 + 0.485, grey[1] * 0.224 + 0.456, atol=1e-5)
    blur = TrainTransform(16, (1.0, 1.0), True, 0.0, p_blur=1.0)(img, None, np.random.default_rng(3))[0]
    assert float(blur.diff(dim=-1).abs().mean()) < 0.7 * float(plain.diff(dim=-1).abs().mean())


def test_the_second_views_colour_operations_make_one_trip_to_rgb(monkeypatch):
    """Colour jitter then grey: the view is normalize(grey(jitter(denormalize(crop)))), one trip to RGB and back
    (a trip per operation rounds twice), and without grey, blur or solarisation un-jittered images keep their bits."""
    import wsss.data.views as views
    from wsss.data.transforms import adjust_colour, denormalize, grayscale, normalize

    img = (torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) - 0.45) / 0.226
    crop = views.random_resized_view(img, torch.Generator().manual_seed(1), jitter=0.0).image
    g = torch.Generator().manual_seed(1)
    torch.rand(2, 8, generator=g)
    f = torch.rand(2, 3, generator=g) * 2 - 1
    b, c, s = (1 + 0.4 * f[:, 0]), (1 + 0.4 * f[:, 1]), (1 + 0.2 * f[:, 2])
    jittered = adjust_colour(denormalize(crop), *(v[:, None, None, None] for v in (b, c, s)))
    both = views.random_resized_view(img, torch.Generator().manual_seed(1), jitter=0.4, p_jitter=1.0, p_gray=1.0)
    assert torch.equal(both.image, normalize(grayscale(jittered)))
    trips = []
    monkeypatch.setattr(views, "denormalize", lambda x: trips.append(1) or denormalize(x))
    views.random_resized_view(img, torch.Generator().manual_seed(1), jitter=0.4, p_jitter=1.0, p_gray=1.0, p_blur=1.0)
    assert len(trips) == 1
    half = views.random_resized_view(img, torch.Generator().manual_seed(1), jitter=0.4, p_jitter=0.5).image
    on = torch.rand(2, 8, generator=torch.Generator().manual_seed(1))[:, 5] < 0.5
    assert on.tolist() == [False, True]  # seed 1 draws one jittered image of two
    assert torch.equal(half[~on], crop[~on]) and not torch.equal(half[on], crop[on])
