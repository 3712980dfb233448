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
