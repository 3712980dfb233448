"""A small pipeline run for the viewer tests, built in seconds: slides with a marked tile (``make_case``), score
files pinned to their slides, the extract and predict records, tissue and annotation GeoJSON, the heatmap
review page, and every way a slide can fail to be viewable.

Slides: ``tumor_a`` (TIFF, correct), ``normal_b`` (SVS, labelled normal, predicted tumor, scored in-sample),
``case c é`` (a space and a non-ASCII letter in the id), ``gone`` (its file deleted after the run),
``swapped`` (scores made from another slide file), ``broken`` (failed extraction) and ``blank`` (no tissue).
"""

from __future__ import annotations

import csv
import json
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from test_heatmap import Case, make_case

from wsi_mil.config.heatmap import HeatmapConfig
from wsi_mil.config.view import ViewConfig
from wsi_mil.runs.heatmap import run_heatmap
from wsi_mil.slide import open_slide
from wsi_mil.store.geojson import annotation, feature_collection, write_geojson
from wsi_mil.viewer import Catalog, ViewerServer

VIEWABLE = ("case c é", "normal_b", "tumor_a")
NOT_VIEWABLE = {"gone": "missing", "swapped": "unavailable", "broken": "failed", "blank": "no_tissue"}
BROKEN_ERROR = "SlideOpenError: broken.svs is truncated: image 0 needs 81920 bytes but the file has 4096. Copy it again."
SECRET = "top-secret-text-outside-the-run"


@dataclass
class ViewerRun:
    root: Path
    cases: dict[str, Case]
    outside: Path  # a folder next to the run, with a secret file the server must never serve


def _fingerprint_into_scores(case: Case, slide_path: Path) -> None:
    with open_slide(slide_path) as slide:
        fingerprint = slide.fingerprint().to_json()
    with h5py.File(case.scores, "a") as fh:
        fh.attrs["slide_fingerprint"] = fingerprint


def build_viewer_run(base: Path) -> ViewerRun:
    root = base / "run"
    cases = {
        "tumor_a": make_case(root, "tumor_a", size=(3000, 2200), mark=(7, 5), label="tumor", bag=(0.1, 0.9)),
        "normal_b": make_case(root, "normal_b", fmt="svs", mpp=0.2631, size=(2400, 1800), mark=(5, 4), label="normal",
                              bag=(0.3, 0.7), seed=1),
        "case c é": make_case(root, "case c é", size=(1600, 1200), mark=(3, 2), label="normal", bag=(0.8, 0.2), seed=2),
        "gone": make_case(root, "gone", size=(1200, 900), mark=(2, 2), label="tumor", bag=(0.2, 0.8), seed=3),
        "swapped": make_case(root, "swapped", size=(1200, 900), mark=(2, 2), label="tumor", bag=(0.2, 0.8), seed=4),
    }
    for sid, case in cases.items():
        # swapped: its scores name tumor_a's slide file, not its own
        _fingerprint_into_scores(case, cases["tumor_a"].slide if sid == "swapped" else case.slide)
    # extract's record of every slide, failures included
    (root / "extract").mkdir()
    with open(root / "extract" / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slide_id", "path", "status", "error_class", "error", "n_tiles"])
        for sid, case in cases.items():
            writer.writerow([sid, str(case.slide), "done", "", "", len(case.coords)])
        writer.writerow(["broken", str(root / "slides" / "broken.svs"), "failed", "SlideOpenError", BROKEN_ERROR, ""])
        writer.writerow(["blank", str(root / "slides" / "blank.tif"), "no_tissue", "", "", 0])
    scored_by = {"tumor_a": "held_out:fold_0", "normal_b": "in_sample:ensemble:5", "case c é": "ensemble:5",
                 "gone": "held_out:fold_1", "swapped": "held_out:fold_2"}
    bags = {"tumor_a": (0.1, 0.9), "normal_b": (0.3, 0.7), "case c é": (0.8, 0.2), "gone": (0.2, 0.8), "swapped": (0.2, 0.8)}
    labels = {"tumor_a": "tumor", "normal_b": "normal", "case c é": "normal", "gone": "tumor", "swapped": "tumor"}
    with open(root / "predict" / "predictions.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slide_id", "case_id", "label", "prob_normal", "prob_tumor", "predicted", "n_tiles", "scored_by"])
        for sid, case in cases.items():
            p0, p1 = bags[sid]
            writer.writerow([sid, sid, labels[sid], p0, p1, "tumor" if p1 > p0 else "normal", len(case.coords), scored_by[sid]])
    (root / "predict" / "predict.json").write_text(json.dumps({"classes": ["normal", "tumor"], "skipped": {"empty": []}}))
    # tissue contour (extract) and a ground-truth lesion around tumor_a's marked tile (the sample cohort's layout)
    a = cases["tumor_a"]
    assert a.mark_index is not None
    x, y = (int(v) for v in a.coords[a.mark_index])
    f = a.footprint
    lesion = [[x - f, y - f], [x + 2 * f, y - f], [x + 2 * f, y + 2 * f], [x - f, y + 2 * f], [x - f, y - f]]
    (root / "cohort" / "annotations").mkdir(parents=True)
    write_geojson(root / "cohort" / "annotations" / "tumor_a.geojson",
                  feature_collection([annotation([lesion], name="lesion 1", class_name="Tumor", color=(200, 0, 0))]))
    angles = np.linspace(0, 2 * np.pi, 40)
    ellipse = [[1500 + 1260 * np.cos(t), 1100 + 924 * np.sin(t)] for t in angles]
    (root / "extract" / "tissue").mkdir()
    write_geojson(root / "extract" / "tissue" / "tumor_a.geojson",
                  feature_collection([annotation([ellipse], name="tissue 1", class_name="Tissue", color=(0, 160, 80))]))
    # the heatmap review page of the run (the swapped slide fails there too, for the same reason)
    run_heatmap([c.slide for c in cases.values()], root / "predict", root / "heatmaps",
                HeatmapConfig(max_side_px=300, top_k=2, write_geojson=False), progress=False)
    cases["gone"].slide.unlink()
    # things outside the run, and links pointing at them from inside its served folders
    outside = base / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET)
    (root / "heatmaps" / "secret_link.txt").symlink_to(outside / "secret.txt")
    (root / "heatmaps" / "link_out").symlink_to(outside, target_is_directory=True)
    (root / "secret.txt").write_text(SECRET)  # in the run, but not in a served folder
    return ViewerRun(root, cases, outside)


@contextmanager
def serving(root: Path, **settings: object) -> Iterator[ViewerServer]:
    """A viewer on ``root`` bound to 127.0.0.1 on a free port, stopped on exit."""
    cfg = ViewConfig(host="127.0.0.1", port=0, **settings)  # type: ignore[arg-type]
    server = ViewerServer(Catalog.open(root), cfg).start()
    try:
        yield server
    finally:
        server.stop()
        assert not any(t.name == "wsi-mil-view" and t.is_alive() for t in threading.enumerate())


def module_fixtures(name: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """Module-scoped ``run`` (a :class:`ViewerRun`) and ``server`` (a viewer on it) fixtures for a test module:
    ``run, server = module_fixtures("name")``."""

    @pytest.fixture(scope="module")
    def run(tmp_path_factory: pytest.TempPathFactory) -> ViewerRun:
        return build_viewer_run(tmp_path_factory.mktemp(name))

    @pytest.fixture(scope="module")
    def server(run: ViewerRun) -> Iterator[ViewerServer]:
        with serving(run.root) as srv:
            yield srv

    return run, server


def copy_heatmaps_alone(run: ViewerRun, dest: Path) -> Path:
    """The run's heatmap folder copied away from its run (so its own heatmap.h5 files are the scores)."""
    out = dest / "heatmaps_alone"
    shutil.copytree(run.root / "heatmaps", out, symlinks=True)
    return out
