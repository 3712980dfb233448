"""Resumable training: a killed `wsi-mil train` keeps its finished folds and the rerun trains the rest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from _train_data import planted_cohort

TIMING_KEYS = {"seconds", "fit_seconds"}


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def _cmd(cohort, run: Path, config: Path) -> list[str]:
    return [sys.executable, "-m", "wsi_mil", "-q", "train", str(cohort.features_dir), "--labels", str(cohort.labels_csv),
            "--out", str(run), "--config", str(config)]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
            "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


def test_sigkill_in_fold_3_of_5_then_rerun_equals_an_uninterrupted_run(tmp_path):
    cohort = planted_cohort(tmp_path / "c", n_slides=20, dim=8, shift=3.0, two_slide_cases=2)
    config = tmp_path / "train.yaml"
    config.write_text(
        "model: {hidden_dims: [16]}\n"
        "training: {epochs: 25, lr: 0.005, device: cpu, deterministic: true, early_stopping_patience: null}\n"
        "splits: {folds: 5}\nmetrics: {n_bootstrap: 200}\n"
    )
    whole = subprocess.run(_cmd(cohort, tmp_path / "whole", config), env=_env(), capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr

    run = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(cohort, run, config), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (run / "fold_1" / "report.json").exists():  # folds 0 and 1 done: fold 2 (the third) is training
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (run / "metrics.json").exists() and not (run / "fold_4" / "report.json").exists()
    kept = {k: (run / f"fold_{k}" / "model.safetensors").stat().st_mtime_ns for k in (0, 1)}

    again = subprocess.run(_cmd(cohort, run, config), env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert {k: (run / f"fold_{k}" / "model.safetensors").stat().st_mtime_ns for k in (0, 1)} == kept  # not retrained
    resumed = json.loads((run / "metrics.json").read_text())
    reference = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert _without_timings(resumed) == _without_timings(reference)
    assert (run / "predictions.csv").read_text() == (tmp_path / "whole" / "predictions.csv").read_text()
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["fold"] for h in history] == sorted(h["fold"] for h in history) and {h["fold"] for h in history} == set(range(5))

    # a finished run run again is a no-op; --overwrite starts over
    stamp = (run / "metrics.json").stat().st_mtime_ns
    noop = subprocess.run(_cmd(cohort, run, config), env=_env(), capture_output=True, text=True, timeout=300)
    assert noop.returncode == 0 and (run / "metrics.json").stat().st_mtime_ns == stamp, noop.stderr
