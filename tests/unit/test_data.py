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
    root = _folder(tmp_path / "f", [("a.jpg", "dog"), ("b.jpg", "dog"), ("c.png", "dog"), ("d.jpg", "")])
    (root / "classes.txt").write_text("dog\ncat\n")
    with open(root / "tags.csv", "a") as f:
        f.write("e.jpg,horse\n")
    Image.new("RGB", (8, 8)).save(root / "images" / "e.jpg")
    (root / "images" / "a.jpg").write_bytes(b"garbage")
    Image.new("RGBA", (8, 8)).save(root / "images" / "c.png")
    write_mask(root / "masks" / "b.png", np.zeros((5, 5), np.uint8), voc_palette().flatten().tolist())
    msgs = [f"{s}: {m}" for s, m in check_root(root)]
    text = "\n".join(msgs)
    assert "a.jpg: corrupt or unreadable image" in text
    assert "b.png: mask is 5x5 but its image is 8x8" in text
    assert "warning" in text and "c.png: image has an alpha channel" in text
    assert "d.jpg: image has no tags" in text
    assert "e.jpg: unknown tag 'horse'" in text
    assert len(msgs) == 5


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
