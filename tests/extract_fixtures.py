"""Fixtures for the ``extract`` tests, loaded with ``pytest_plugins = ("extract_fixtures",)``.

A plugin rather than names imported into each test module, so the session fixtures (the cohort and
the reference run) are built once per session.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from extract_helpers import fast_config, make_cohort


@pytest.fixture
def one_torch_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """``run_extract`` in this process uses one torch thread (it reads ``OMP_NUM_THREADS``).

    Not autouse: the plugin is loaded for the whole session; the extract modules opt in with
    ``pytestmark``.
    """
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Four small slides (two ``.tif`` at 0.5 µm/px, two ``.svs`` at 0.25 µm/px), ~30-60 tiles each."""
    return make_cohort(tmp_path_factory.mktemp("cohort"), 4)


@pytest.fixture(scope="session")
def reference(cohort: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted, unsharded, in-process run over :func:`cohort` (the comparison baseline)."""
    from wsi_mil.runs.extract import run_extract

    out = tmp_path_factory.mktemp("reference")
    summary = run_extract(cohort, out, fast_config(), progress=False, threads=1)
    assert summary.exit_code == 0, summary.text()
    assert summary.counts["done"] == len(cohort)
    return out
