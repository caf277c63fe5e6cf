"""What a registered dataset gives wsss: its splits, and what ``wsss data check``, ``wsss prepare``, the root
auto-detection and the step benchmark ask of it. The CLI and benchmarks only talk to this, never to a
dataset by name. A plain ``build(cfg, split, transform, load_masks)`` function also registers (it then
has no check, detection or preparation)."""

from __future__ import annotations

from pathlib import Path

from wsss.data.classes import ClassSpec

Problems = list[tuple[str, str]]  # (severity: "error" | "warning" | "info", one-line message)


class DatasetSpec:
    """Base of a registered dataset; register an instance: ``DATASETS.register("name")(MySpec())``.

    Attributes:
        Config: its settings' dataclass, read from the recipe's ``data.<name>`` section into ``data.options``
            (None: the dataset has no settings of its own).
        classes: the standard classes when the data does not say (None: they always come from the data).
        layout: one line on what a root of this dataset holds, shown when no dataset recognises a root.
    """

    classes: ClassSpec | None = None
    layout: str = ""
    Config: type | None = None  # a frozen dataclass: the dataset's own settings, the section data.<name>

    def build(self, cfg, split: str, transform, load_masks: bool):
        """The SegDataset of ``split`` under the DataConfig ``cfg``, with ``transform``; ``load_masks``:
        read masks (evaluation, full supervision)."""
        raise NotImplementedError

    def __call__(self, cfg, split: str, transform, load_masks: bool):
        return self.build(cfg, split, transform, load_masks)

    def detect(self, root: Path) -> int:
        """How surely ``root`` is a root of this dataset: 0 not at all; the highest score wins auto-detection."""
        return 0

    def check(self, root: Path) -> Problems:
        """Every problem under ``root``, one line each (`wsss data check`)."""
        return [("warning", f"{root}: this dataset has no checks; only training will find its problems")]

    def prepare(self, root: Path, sbd: str | None = None, overwrite: bool = False) -> dict:
        """One-off conversion of a downloaded root (`wsss prepare`); returns counts to print. ``sbd``: an
        extra source folder; ``overwrite``: replace files an earlier preparation wrote."""
        raise NotImplementedError(f"{type(self).__name__} has no conversion")

    def can_prepare(self) -> bool:
        """Whether :meth:`prepare` converts anything (it is overridden)."""
        return type(self).prepare is not DatasetSpec.prepare

    def generate(self, root: Path) -> bool:
        """Write the dataset into ``root`` (missing or empty) when it can be made on the spot, as the built-in
        synthetic data can; returns whether it did. Default: it cannot (real data is downloaded)."""
        return False


def detect(root: Path, specs: dict) -> str | None:
    """The name of the dataset in ``specs`` {name: entry} that recognises ``root`` most surely (ties: first
    name in sorted order), or None when none does."""
    scores = {name: (e.detect(root) if isinstance(e, DatasetSpec) else 0) for name, e in sorted(specs.items())}
    best = max(scores, key=lambda n: scores[n], default=None)
    return best if best is not None and scores[best] > 0 else None
