"""End to end under faults: a cohort mixing good slides with a zero-byte, a truncated, a corrupt-tile, a
no-mpp, a text-file and a no-tissue slide; extraction SIGKILLed once after its first bag, then the
``pipeline`` entry resumes it and trains, predicts and renders heatmaps on the good slides, while the
extract manifest explains every other slide (status and error class).

Fast setting: timm's tiny test network with random weights, 128 px tiles, 2 folds, a few epochs.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from extract_helpers import FAST_ARGS, fast_config, manifest, start_cli, temp_files, wait_for, write_slide

from wsi_mil.demo.broken import write_broken_slides
from wsi_mil.runs.pipeline import load_pipeline_config, run_pipeline
from wsi_mil.store.bag_file import bag_is_complete

GOOD_SYNTHETIC = 5

#: slide id -> (manifest status, error class, a phrase the message must contain)
EXPECTED = {
    "broken_zero_bytes": ("failed", "SlideOpenError", "empty (0 bytes)"),
    "broken_not_a_slide": ("failed", "SlideOpenError", "not a slide"),
    "broken_truncated": ("failed", "SlideOpenError", "truncated"),
    "broken_no_mpp": ("failed", "MissingMPPError", "--mpp-override"),
    "broken_corrupt_tile": ("failed", "SlideReadError", "corrupt tile"),
    "blank_no_tissue": ("no_tissue", "NoTissueError", "no tissue"),
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str], tuple[int, int]]:
    """``(slides folder, labels.csv, good slide ids, corrupt tile's level-0 (x, y))``."""
    root = tmp_path_factory.mktemp("e2e cohort é")  # R22 on the way: spaces and unicode in the path
    slides = root / "slides"
    zoo = write_broken_slides(slides)
    box = json.loads((slides / "broken_slides.json").read_text())["corrupt_tile_box_level0_px"]
    good = [zoo["good"].stem]
    for i in range(GOOD_SYNTHETIC):
        suffix = ".svs" if i % 2 else ".tif"
        good.append(write_slide(slides / f"case{i:02d}{suffix}", seed=1 + i).stem)
    labels = root / "labels.csv"
    with open(labels, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slide_id", "label"])
        for i, sid in enumerate(good + list(EXPECTED)):  # the broken slides are labelled too
            writer.writerow([sid, "tumor" if i % 2 else "normal"])
    return slides, labels, good, (int(box[0]), int(box[1]))


def _pipeline_yaml(path: Path, out: Path, slides: Path, labels: Path) -> Path:
    extract = fast_config().model_dump(mode="json")
    spec = {
        "out": str(out),
        "sample_data": None,
        "slides": [str(slides)],
        "labels": str(labels),
        "extract": extract,
        "train": {
            "splits": {"folds": 2},
            "training": {"epochs": 4, "device": "cpu", "early_stopping_patience": None},
            "metrics": {"n_bootstrap": 20},
        },
        "predict": {"device": "cpu", "metrics": {"n_bootstrap": 20}},
        "heatmap": {"top_k": 2, "max_side_px": 256, "figure_dpi": 60, "write_geojson": False},
    }
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


def test_e2e_faulty_cohort_killed_extract_resumes_and_the_pipeline_completes(
    cohort: tuple[Path, Path, list[str], tuple[int, int]], tmp_path: Path
) -> None:
    slides, labels, good, (cx, cy) = cohort
    out = tmp_path / "run"
    features = out / "extract" / "features"

    # 1. extract in a child interpreter, SIGKILLed as soon as the first bag is in place
    proc = start_cli("-q", "extract", str(slides), "--out", str(out / "extract"), *FAST_ARGS, start_new_session=True)
    try:
        appeared = wait_for(lambda: any(features.glob("*.h5")), 240, proc)
        assert appeared and proc.poll() is None, f"extract ended before the kill: {proc.communicate()}"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    done_before = sorted(p.stem for p in features.glob("*.h5"))
    assert 1 <= len(done_before) < len(good)
    assert all(bag_is_complete(features / f"{sid}.h5") for sid in done_before)  # never partial (R10)

    # 2. the pipeline entry, same extract settings: resumes, then train -> predict -> heatmap
    cfg = load_pipeline_config(_pipeline_yaml(tmp_path / "pipeline.yaml", out, slides, labels))
    result = run_pipeline(cfg, progress=False)
    assert result.exit_code == 1  # slides failed: reported, not hidden

    rows = manifest(out / "extract")
    assert set(rows) == set(good) | set(EXPECTED)
    for sid in good:
        assert rows[sid]["status"] in ("done", "skipped"), rows[sid]
        assert bag_is_complete(features / f"{sid}.h5")
    assert {sid for sid in done_before if rows[sid]["status"] == "skipped"} == set(done_before)  # not redone
    for sid, (status, error_class, phrase) in EXPECTED.items():
        row = rows[sid]
        assert (row["status"], row["error_class"]) == (status, error_class), row
        assert phrase in row["error"], row["error"]
        assert not (features / f"{sid}.h5").exists()
    assert f"level-0 ({cx}, {cy})" in rows["broken_corrupt_tile"]["error"]  # R4: the tile is named
    assert temp_files(features) == []  # the killed writer's temp file is gone

    metrics = json.loads((out / "train" / "metrics.json").read_text())
    assert metrics["cohort"]["n_used"] == len(good)
    assert sorted(metrics["cohort"]["labelled_without_features"]) == sorted(EXPECTED)
    assert "pooled OOF" in result.train_table
    with open(out / "predict" / "predictions.csv", newline="", encoding="utf-8") as fh:
        assert {r["slide_id"] for r in csv.DictReader(fh)} == set(good)
    for sid in good:
        assert (out / "heatmaps" / sid / "heatmap.png").stat().st_size > 0
    assert result.index_html == out / "heatmaps" / "index.html" and result.index_html.is_file()
    text = result.text()
    assert str(result.index_html) in text and "heatmap.png" in text and "AUC" in text.upper()


def test_pipeline_cli_rejects_unknown_keys_and_mixed_cohorts(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from wsi_mil.cli import main

    bad = tmp_path / "p.yaml"
    bad.write_text("out: x\nextract:\n  tiling:\n    tile_size: 256\n")
    res = CliRunner().invoke(main, ["pipeline", str(bad)])
    assert res.exit_code == 2 and "unknown key 'extract.tiling.tile_size'" in res.output
    mixed = tmp_path / "m.yaml"
    mixed.write_text("slides: [a]\nlabels: l.csv\n")  # the sample cohort is the default
    res = CliRunner().invoke(main, ["pipeline", str(mixed)])
    assert res.exit_code == 2 and "either sample_data, or slides and labels" in res.output
    defaults = load_pipeline_config(Path(__file__).resolve().parents[1] / "configs" / "pipeline.yaml")
    assert defaults.sample_data is not None and defaults.slides is None


def test_pipeline_help_is_light() -> None:
    code = "import sys, wsi_mil.cli; assert 'torch' not in sys.modules and 'wsi_mil.runs.pipeline' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
