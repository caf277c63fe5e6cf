"""`wsss report RUN`: the HTML page and its figures, the scores they show, and the output guard."""

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss.cli import main
from wsss.data.classes import ClassSpec
from wsss.report import per_class_series, plot_confusion


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.cells = [], []

    def handle_starttag(self, tag, attrs):
        self.refs += [v for k, v in attrs if k in ("src", "href")]

    def handle_data(self, data):
        self.cells.append(data.strip())


def _parse(page: Path) -> _Refs:
    p = _Refs()
    p.feed(page.read_text())
    return p


def test_report_page_references_only_its_own_files_and_shows_the_runs_scores(tiny_toco_run, tmp_path):
    out = tmp_path / "rep"
    assert main(["report", str(tiny_toco_run), "--out", str(out), "--samples", "3"]) == 0
    refs = _parse(out / "index.html")
    assert sorted(refs.refs) == ["confusion.png", "curves.png", "per_class.png", "samples.png"]
    assert all((out / r).is_file() and not re.match(r"\w+://", r) for r in refs.refs)
    for r in refs.refs:
        with Image.open(out / r) as im:
            assert im.format == "PNG" and min(im.size) > 100
    final = json.loads((tiny_toco_run / "final_eval.json").read_text())
    assert "final_eval.json" in refs.cells  # the stored evaluation, not a second one
    for k in ("seg", "cam", "pseudo"):
        i = refs.cells.index(f"{k}_miou")
        assert refs.cells[i + 1] == f"{100 * final[k]['miou']:.2f}"
    row = refs.cells.index("person")  # the per-class table: cam, pseudo, seg IoU of the class
    assert refs.cells[row + 1 : row + 4] == [f"{100 * final[k]['iou'][5]:.2f}" for k in ("cam", "pseudo", "seg")]
    index = json.loads((out / "report.json").read_text())
    assert sorted(index["images"][0]["outputs"]) == sorted([*refs.refs, "index.html"])
    with Image.open(out / "samples.png") as im:
        assert im.size[1] > 2.5 * im.size[0] / 5  # three rows of five columns, taller than one row


def test_report_evaluates_when_no_stored_matrix_and_agrees_with_the_stored_scores(tiny_toco_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_toco_run, run)
    final = json.loads((run / "final_eval.json").read_text())
    for k in final.values():
        k.pop("confusion", None)
    (run / "final_eval.json").write_text(json.dumps(final))  # as a run from before the matrix was stored
    assert main(["report", str(run), "--samples", "1"]) == 0
    refs = _parse(run / "report" / "index.html")
    assert any(c.startswith("evaluated by wsss report") for c in refs.cells)
    i = refs.cells.index("seg_miou")
    assert refs.cells[i + 1] == f"{100 * final['seg']['miou']:.2f}"


def test_report_never_replaces_a_file_it_did_not_write(tiny_toco_run, tmp_path, capsys):
    out = tmp_path / "rep"
    out.mkdir()
    (out / "curves.png").write_bytes(b"the user's")
    assert main(["report", str(tiny_toco_run), "--out", str(out), "--samples", "1"]) == 1
    assert "curves.png: exists" in capsys.readouterr().err and (out / "curves.png").read_bytes() == b"the user's"
    (out / "curves.png").unlink()
    assert main(["report", str(tiny_toco_run), "--out", str(out), "--samples", "1"]) == 0
    assert main(["report", str(tiny_toco_run), "--out", str(out), "--samples", "1"]) == 1  # an earlier report
    assert main(["report", str(tiny_toco_run), "--out", str(out), "--samples", "1", "--overwrite"]) == 0


def test_confusion_rows_are_normalised_and_tag_runs_get_ap_bars(tmp_path):
    conf = np.array([[6, 2, 0], [0, 0, 0], [1, 1, 2]])
    norm = plot_confusion(conf, ["background", "a", "b"], tmp_path / "c.png")
    assert np.allclose(norm, [[0.75, 0.25, 0], [0, 0, 0], [0.25, 0.25, 0.5]]) and (tmp_path / "c.png").is_file()
    classes = ClassSpec(("a", "b"))
    series, names, metric = per_class_series({"tags": {"ap": [0.5, 0.25], "map": 0.375}}, classes)
    assert series == {"tags": [50.0, 25.0]} and names == ["a", "b"] and metric == "AP"
    series, names, metric = per_class_series(
        {"seg": {"iou": [1.0, 0.5, 0.0]}, "cam": {"iou": [0.5, 0.5, 0.5]}}, classes
    )
    assert list(series) == ["cam", "seg"] and names == ["background", "a", "b"] and metric == "IoU"


def _chromium() -> str | None:
    return next((b for b in ("chromium", "chromium-browser", "google-chrome", "headless_shell") if shutil.which(b)),
                None)  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="no headless Chromium on this machine (scripts/render_report.sh)")
def test_report_renders_in_headless_chromium(tiny_toco_run, tmp_path):
    out = tmp_path / "rep"
    assert main(["report", str(tiny_toco_run), "--out", str(out), "--samples", "2"]) == 0
    shot = tmp_path / "shot.png"
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,2400", (out / "index.html").as_uri()], check=True, timeout=120)  # fmt: skip
    px = np.asarray(Image.open(shot).convert("L"))
    assert px.std() > 10  # text and figures drawn, not a blank page


def test_report_scores_only_the_model_it_shows(tiny_toco_run, demo_root, tmp_path, capsys):
    """Stored scores are used for the run's last checkpoint only: a checkpoint target, a resumed run
    (final_eval.json older than last.pt) or an --eval override is evaluated afresh; overrides reach the run."""
    run = tmp_path / "run"
    shutil.copytree(tiny_toco_run, run)
    src = "evaluated by wsss report"
    assert main(["report", str(run / "checkpoints" / "last.pt"), "--out", str(tmp_path / "a"), "--samples", "1"]) == 0
    assert "final_eval.json" in _parse(tmp_path / "a" / "index.html").cells
    ckpt = run / "checkpoints" / "other.pt"
    shutil.copy(run / "checkpoints" / "last.pt", ckpt)
    assert main(["report", str(ckpt), "--out", str(tmp_path / "b"), "--samples", "1"]) == 0
    assert any(c.startswith(src) for c in _parse(tmp_path / "b" / "index.html").cells)
    os.utime(run / "final_eval.json", (1, 1))  # as after a resume that has not finished
    assert main(["report", str(run), "--out", str(tmp_path / "c"), "--samples", "1"]) == 0
    assert any(c.startswith(src) for c in _parse(tmp_path / "c" / "index.html").cells)
    assert main(["report", str(run), "--out", str(tmp_path / "d"), "--samples", "1", "--data.root", str(demo_root),
                 "--eval.flip", "true"]) == 0  # fmt: skip
    assert any(c.startswith(src) for c in _parse(tmp_path / "d" / "index.html").cells)
    assert main(["report", str(run), "--out", str(tmp_path / "e"), "--samples", "0"]) == 1
    assert "--samples 0" in capsys.readouterr().err and not (tmp_path / "e").exists()
