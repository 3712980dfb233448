"""The GPU check script and the figures it and ``extract.py --many-small`` compute, without a GPU.

``benchmarks/gpu_check.sh`` itself runs only on a lent GPU machine (or in its CPU mode, minutes); here: it
parses (``bash -n``), passes shellcheck where installed, and the figure helpers compute the right numbers
from small records written here.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))

import _many_small  # noqa: E402
import _run_figures  # noqa: E402


def test_gpu_check_script_parses_and_passes_shellcheck() -> None:
    assert SCRIPT.read_text().startswith("#!/usr/bin/env bash") and "set -euo pipefail" in SCRIPT.read_text()
    res = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (Debian: apt-get install shellcheck)")
    res = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_gpu_check_refuses_an_unknown_device(tmp_path: Path) -> None:
    res = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, check=False,
                         env={"PATH": "/usr/bin:/bin", "GPU_CHECK_DEVICE": "tpu", "OUT": str(tmp_path)})  # fmt: skip
    assert res.returncode == 2 and "GPU_CHECK_DEVICE must be cuda or cpu" in res.stderr
    assert not any(tmp_path.iterdir())  # nothing written before the check


def _bag(path: Path, feats: np.ndarray, coords: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as h:
        h["features"] = feats
        h["coords"] = coords


def test_cosine_per_tile_pairs_bags_by_slide_and_refuses_other_tiles(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 8)).astype(np.float32)
    coords = np.arange(10, dtype=np.int64).reshape(5, 2)
    y = x.copy()
    y[2] = -y[2]  # one tile pointing the other way: cosine -1
    y[3] *= 3.0  # scale does not change the cosine
    _bag(tmp_path / "a" / "features" / "s1.h5", x, coords)
    _bag(tmp_path / "b" / "features" / "s1.h5", y, coords)
    _bag(tmp_path / "a" / "features" / "s2.h5", x, coords)  # only in one run: ignored
    res = _run_figures.cosine_per_tile(tmp_path / "a", tmp_path / "b")
    assert res["tiles"] == 5 and [s["slide"] for s in res["slides"]] == ["s1"]
    assert res["min"] == pytest.approx(-1.0) and res["mean"] == pytest.approx(3 / 5)
    _bag(tmp_path / "b" / "features" / "s2.h5", x, coords + 1)
    with pytest.raises(SystemExit, match="tiled the slide differently"):
        _run_figures.cosine_per_tile(tmp_path / "a", tmp_path / "b")


def _run_folder(out: Path, rows: list[dict[str, object]], *, seconds: float, tiles: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps({
        "device": "cuda:0 (NVIDIA H100)", "precision": "bf16", "loader": "processes", "loader_workers": 2,
        "torch_threads": 2, "totals": {"tiles": tiles, "seconds": seconds}, "finished": "2026-12-07T10:00:10+0000",
    }))  # fmt: skip
    (out / "config.yaml").write_text("encoder: uni\nbatch_size: 128\nrandom_init: true\nchannels_last: true\ntiling: {tile_px: 256}\n")
    with open(out / "manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out


def test_stream_figures_use_recorded_gaps_and_say_when_they_are_not_recorded(tmp_path: Path) -> None:
    rows = [{"slide_id": f"s{i:03d}", "status": "done", "seconds": 2.0, "model_s": 1.5, "rss_mb": 1000 + i, "gap_s": 0.1 * i}
            for i in range(12)]  # fmt: skip
    rows.append({"slide_id": "s999", "status": "failed", "seconds": "", "model_s": "", "rss_mb": "", "gap_s": ""})
    fig = _many_small.stream_figures(_run_folder(tmp_path / "with", rows, seconds=30.0, tiles=600))
    assert fig["gap_is_recorded"] and fig["slides"] == 12 and fig["e2e"] == pytest.approx(20.0)
    assert fig["gap_median"] == pytest.approx(0.6) and fig["gap_p95"] == pytest.approx(1.05)  # slides 2..12
    assert fig["rss_10"] == 1009 and fig["rss_last"] == 1011
    assert fig["non_model_per_slide"] == pytest.approx((30.0 - 12 * 1.5) / 12)
    for r in rows:
        del r["gap_s"]
    fig = _many_small.stream_figures(_run_folder(tmp_path / "without", rows, seconds=30.0, tiles=600))
    assert not fig["gap_is_recorded"] and fig["gap_median"] == pytest.approx(0.5)  # seconds - model_s


def test_gpu_utilisation_is_summarised_over_the_batch_phase(tmp_path: Path) -> None:
    run = _run_folder(tmp_path / "run", [{"slide_id": "s1", "status": "done"}], seconds=5.0, tiles=10)
    finished = json.loads((run / "run.json").read_text())["finished"]
    import datetime as dt

    end = dt.datetime.strptime(finished, "%Y-%m-%dT%H:%M:%S%z").astimezone().replace(tzinfo=None)
    lines = []
    for i in range(40):  # 0.25 s apart: 10 s before the end (idle while loading), then 5 s busy
        t = end - dt.timedelta(seconds=10 - i * 0.25)
        busy = t >= end - dt.timedelta(seconds=5)
        lines.append(f"{t:%Y/%m/%d %H:%M:%S.%f}, {90 if busy else 0}, {2000 if busy else 500}")
    lines.append("garbage line")
    (tmp_path / "util.csv").write_text("\n".join(lines) + "\n")
    res = _run_figures.util(tmp_path / "util.csv", run)
    assert res["whole_step"]["samples"] == 40 and res["whole_step"]["memory_max_mib"] == 2000
    assert res["batch_phase"]["util_p50"] == 90 and res["whole_step"]["util_p50"] < 90
    assert res["batch_phase"]["samples"] < 40


def test_summary_states_each_step_and_figure(tmp_path: Path) -> None:
    (tmp_path / "steps.tsv").write_text(
        "step\tstatus\trc\tseconds\tlimit_s\tnote\nenv\tok\t0\t1.5\t60\t\nextract_cnn\ttimeout\t124\t150.0\t150\tresnet50_trunc\n"
        "train\tskipped\t\t0\t90\ttime budget spent\n"
    )
    (tmp_path / "meta.json").write_text(json.dumps({"mode": "cuda", "budget_s": 450, "cnn": "resnet50_trunc", "cnn_weights": "no"}))
    (tmp_path / "cosine_vit.json").write_text(json.dumps(
        {"reference": "cpu fp32", "tiles": 300, "min": 0.9995, "mean": 0.9999, "slides": [{}, {}], "run_precision": "bf16"}))  # fmt: skip
    _run_figures.main(["summary", str(tmp_path)])
    text = (tmp_path / "gpu_check.txt").read_text()
    assert "extract_cnn" in text and "timeout" in text and "time budget spent" in text and "151.5 s (budget 450 s)" in text
    assert "min 0.99950" in text and "no encoder-alone figure" in text
    assert json.loads((tmp_path / "gpu_check.json").read_text())["steps"][1]["status"] == "timeout"
