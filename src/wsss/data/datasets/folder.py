"""A user's own tagged folder::

    ROOT/images/*.jpg|png
    ROOT/tags.csv          header ``image,tags``; tags separated by ';'
    ROOT/masks/<stem>.png  optional palette PNGs, for evaluation
    ROOT/classes.txt       optional class order (else the sorted set of tags)
    ROOT/<split>.txt       optional list of image file names for a split (else every row of tags.csv)

Train and val can be two separate folders (``data.train_root`` / ``data.val_root``); both must
share one class list (give classes.txt, or the train folder's tags define it). One folder without
split lists is split by itself: ``data.folder.holdout`` (0.1) of its images, chosen by a hash of their names
(the same on every run and machine), are the val split and are not trained on, so its val scores
(mIoU, or the tag-level score of a folder without masks) are measured on images the model has not
seen; with only ``<val_split>.txt``, training takes every image it does not list.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from wsss.data.base import Item, SegDataset, data_root, read_list
from wsss.data.classes import ClassSpec
from wsss.data.datasets.voc import read_classes_txt
from wsss.data.io import DataError
from wsss.data.spec import DatasetSpec, Problems
from wsss.registry import DATASETS

log = logging.getLogger("wsss")
_told: set[str] = set()  # roots whose unlisted images were reported (once per process)


def read_tags_csv(root: Path, problems: list[tuple[str, str]] | None = None) -> list[tuple[str, tuple[str, ...]]]:
    """Rows (image file name, tags) of ROOT/tags.csv, UTF-8 with or without the byte-order mark that
    spreadsheet programs write.

    A malformed row, an image without tags or an image listed twice with different tags raises DataError
    naming the file and lines (a repeated identical row is kept once, with a warning); with a ``problems``
    list, each is appended there as ("error" or "warning", message) instead and reading goes on.
    """
    path = root / "tags.csv"

    def bad(msg: str) -> None:
        if problems is None:
            raise DataError(msg)
        problems.append(("error", msg))

    if not path.is_file():
        bad(f"{path}: tags file missing (expected columns image,tags)")
        return []
    rows = []
    seen: dict[str, tuple[int, tuple[str, ...]]] = {}
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        bad(f"{path}: not UTF-8 text (byte {e.start}); save it as 'CSV UTF-8'")
        return []
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if not header or [h.strip().lower() for h in header[:2]] != ["image", "tags"]:
        bad(f"{path}: first line must be the header 'image,tags'")
        return []
    for lineno, row in enumerate(reader, start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2:
            bad(f"{path}:{lineno}: expected 'image,tags', got {','.join(row)!r}")
            continue
        name = row[0].strip()
        if not name or Path(name).is_absolute() or ".." in Path(name).parts:  # rows only name files under images/
            bad(f"{path}:{lineno}: {name!r} is not a file name under images/")
            continue
        tags = tuple(t.strip() for t in row[1].split(";") if t.strip())
        if not tags:
            bad(f"{root / 'images' / name}: image has no tags ({path.name}:{lineno})")
        if name in seen:
            first, earlier = seen[name]
            if set(earlier) != set(tags):
                bad(f"{path}:{lineno}: {name} is listed again with other tags ({';'.join(tags)} here, "
                    f"{';'.join(earlier)} on line {first}); keep one row per image")  # fmt: skip
            elif problems is not None:
                problems.append(("warning", f"{path}:{lineno}: {name} repeats line {first}; read once"))
            else:
                log.warning("%s:%d: %s repeats line %d; read once", path, lineno, name, first)
            continue
        seen[name] = (lineno, tags)
        rows.append((name, tags))
    return rows


def folder_classes(root: Path, rows, no_background: bool) -> ClassSpec:
    """ClassSpec from classes.txt if present, else from the sorted tags (tags that differ only in case, such as
    "Cat" and "cat", are refused there: one class or two is the user's call, made in classes.txt)."""
    ct = root / "classes.txt"
    if ct.is_file():
        return ClassSpec(read_classes_txt(ct), background=not no_background)
    names = tuple(sorted({t for _, ts in rows for t in ts}))
    spellings: dict[str, list[str]] = {}
    for n in names:
        spellings.setdefault(n.casefold(), []).append(n)
    if clash := [v for v in spellings.values() if len(v) > 1]:
        raise DataError(f"{root / 'tags.csv'}: tags that differ only in case: {', '.join('/'.join(v) for v in clash)}; "
                        f"use one spelling, or list the classes in {ct}")  # fmt: skip
    return ClassSpec(names, background=not no_background)


def unlisted_images(root: Path, rows) -> list[str]:
    """Files in ROOT/images that tags.csv does not list (they are not used)."""
    listed = {f for f, _ in rows}
    folder = root / "images"
    return sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.name not in
                  listed) if folder.is_dir() else []  # fmt: skip


def folder_item(root: Path, fname: str, tags) -> Item:
    """The Item of one tags.csv row: ``images/FNAME``, its mask ``masks/STEM.png`` when that file exists."""
    mask = root / "masks" / f"{Path(fname).stem}.png"
    return Item(Path(fname).stem, root / "images" / fname, mask if mask.is_file() else None, tuple(tags))


def read_folder(root: Path, split: str | None, classes: ClassSpec | None, no_background: bool):
    """(items, classes) of a tagged folder; ``classes`` given means use that class list."""
    rows = read_tags_csv(root)
    classes = classes or folder_classes(root, rows, no_background)
    if (extra := unlisted_images(root, rows)) and str(root) not in _told:
        _told.add(str(root))
        log.warning("%s: %d file(s) in images/ not in tags.csv are not used (e.g. %s)", root, len(extra),
                    ", ".join(extra[:3]))  # fmt: skip
    split_file = root / f"{split}.txt" if split else None
    if split_file is not None and split_file.is_file():
        keep = set(read_list(split_file))
        rows = [r for r in rows if r[0] in keep or Path(r[0]).stem in keep]
    items = [folder_item(root, fname, tags) for fname, tags in rows]
    if not items:
        raise DataError(f"{root}: no images listed " + (f"for split '{split}'" if split else "in tags.csv"))
    return items, classes


def held_out(names: list[str], share: float) -> set[str]:
    """The names of a ``share`` of ``names`` (at least 1 of 2 or more, never all): those whose SHA-1
    comes first, whatever the order of ``names``."""
    if share <= 0 or len(names) < 2:
        return set()
    k = min(len(names) - 1, max(1, round(share * len(names))))
    return set(sorted(names, key=lambda n: hashlib.sha1(n.encode()).hexdigest())[:k])


class FolderDataset(DatasetSpec):
    """A tagged folder (see the module docstring); its classes always come from the data."""

    @dataclass(frozen=True)
    class Config:
        """``data.folder.holdout``: the share of a single folder without split lists held out as its val split;
        ``data.folder.no_background``: the domain has no background class (label 0 is the first tag)."""

        holdout: float = 0.1
        no_background: bool = False

        def __post_init__(self) -> None:
            from wsss.config import ConfigError

            if not 0 <= self.holdout < 1:
                raise ConfigError(f"config key 'data.folder.holdout' must be in [0, 1), got {self.holdout!r}")

    layout = "folder (images/, tags.csv)"

    def detect(self, root: Path) -> int:
        """3 when ROOT/tags.csv exists: a user's folder may also hold other layouts' files."""
        return 3 if (root / "tags.csv").is_file() else 0

    def check(self, root: Path) -> Problems:
        """tags.csv rows, class list, unlisted images and every listed image and mask."""
        from wsss.data.check import check_items

        if not (root / "images").is_dir():
            return [("error", f"{root / 'images'}: images folder missing")]
        problems: Problems = []
        rows = read_tags_csv(root, problems)
        try:
            classes = folder_classes(root, rows, no_background=False)
        except DataError as e:
            return [*problems, ("error", str(e))]
        if extra := unlisted_images(root, rows):
            problems.append(("warning", f"{root / 'images'}: {len(extra)} file(s) not in tags.csv are not used (e.g. "
                             f"{', '.join(extra[:3])})"))  # fmt: skip
        return problems + check_items([folder_item(root, f, t) for f, t in rows], classes, report_untagged=False)

    def build(self, cfg, split: str, transform, load_masks: bool) -> SegDataset:
        """Folder dataset for ``split``; the class list always comes from the train folder. Train and val in
        one folder: without ``<split>.txt`` lists val is the ``data.folder.holdout`` share and train the rest; with
        only a val list, train is every image not in it."""
        opts = cfg.options if isinstance(cfg.options, FolderDataset.Config) else FolderDataset.Config()
        train_root = data_root(cfg.train_root or cfg.root, "folder")
        _, classes = read_folder(train_root, None, None, opts.no_background)
        val_root = data_root(cfg.val_root or cfg.root or cfg.train_root, "folder")
        root = train_root if split == cfg.train_split else val_root
        items, classes = read_folder(root, split, classes, opts.no_background)
        if split == cfg.val_split == cfg.train_split or train_root.resolve() != val_root.resolve():
            return SegDataset(items, classes, transform, load_masks)
        train_list, val_list = (root / f"{s}.txt" for s in (cfg.train_split, cfg.val_split))
        if split == cfg.train_split and val_list.is_file() and not train_list.is_file():
            val = {it.name for it in read_folder(root, cfg.val_split, classes, opts.no_background)[0]}
            items = [it for it in items if it.name not in val]
        elif split in (cfg.train_split, cfg.val_split) and not train_list.is_file() and not val_list.is_file():
            n, held = len(items), held_out([it.name for it in items], opts.holdout)
            if held:
                items = [it for it in items if (it.name in held) == (split == cfg.val_split)]
                log.info("%s: no %s or %s, so %d of its %d images (data.folder.holdout %g) are the val split, not "
                         "trained on", root, train_list.name, val_list.name, len(held), n, opts.holdout)  # fmt: skip
        if not items:
            raise DataError(f"{root}: no images left for split '{split}' once the val split is set aside")
        return SegDataset(items, classes, transform, load_masks)


DATASETS.register("folder")(FolderDataset())
