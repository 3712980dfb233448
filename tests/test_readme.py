"""The README's Reliability table lists every fault R1..R28 and names tests that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_reliability_table_covers_every_row_with_existing_tests() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Reliability") : text.index("## Development")]
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| (R\d+) \|.*$", section, re.M)}
    assert sorted(rows, key=lambda r: int(r[1:])) == [f"R{i}" for i in range(1, 29)]
    e2e = "test_e2e_faults.py::test_e2e_faulty_cohort_killed_extract_resumes_and_the_pipeline_completes"
    assert e2e in section
    for row, line in rows.items():
        refs = re.findall(r"`(test_\w+\.py)::(test_\w+)`", line) + ([tuple(e2e.split("::"))] if line.rstrip(" |").endswith("e2e") else [])
        assert refs, f"{row} names no test"
        for file, name in refs:
            source = (ROOT / "tests" / file).read_text(encoding="utf-8")
            assert re.search(rf"^def {name}\(", source, re.M), f"{row}: {file}::{name} does not exist"


def test_the_readme_states_the_objective_defaults_of_their_one_source() -> None:
    from wsi_mil.mil import ObjectiveSettings

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    model = text[text.index("## The model") : text.index("## Conventions")]
    num = r"(\d+(?:\.\d+)?)"
    found = re.findall(rf"λ = {num}, ω_max = {num},\s+ramp-up R = {num} epochs, β = {num}", model)
    assert len(found) == 1, "the model section states the objective's defaults once"
    defaults = ObjectiveSettings()
    stated = [float(v) for v in found[0]]
    assert stated == [defaults.recall_weight, defaults.consistency_max, defaults.rampup_epochs, defaults.ema_beta]
    assert "provisional" not in model and "benchmarks/wsi_ablation.py" in model and "`loss_attention` only" in model
