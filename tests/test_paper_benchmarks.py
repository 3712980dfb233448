"""The paper benchmarks: their lock-step engine equals one-by-one training, and their --quick modes run."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wsi_mil.mil import create_model, mil_loss

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from _lockstep import LockstepReplicas  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("name", ["loss_attention", "abmil", "max"])
def test_lockstep_training_equals_training_each_replica_alone(name: str) -> None:
    torch.manual_seed(0)
    models = [
        create_model(name, in_dim=6, n_classes=2, hidden_dims=(8,), dropout=0.0).double() for _ in range(3)
    ]
    alone = [copy.deepcopy(m) for m in models]
    engine = LockstepReplicas(models, lr=1e-2, weight_decay=1e-3)
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-2, weight_decay=1e-3) for m in alone]
    generator = torch.Generator().manual_seed(1)
    for _ in range(6):
        lengths = torch.randint(1, 7, (3,), generator=generator).tolist()
        bags = [torch.randn(n, 6, generator=generator, dtype=torch.float64) for n in lengths]
        labels = torch.randint(0, 2, (3,), generator=generator)
        padded = torch.zeros(3, max(lengths), 6, dtype=torch.float64)
        mask = torch.zeros(3, max(lengths), dtype=torch.bool)
        for r, bag in enumerate(bags):
            padded[r, : len(bag)], mask[r, : len(bag)] = bag, True
        out = engine.forward(padded, mask, shared_input=False, train=True)
        terms = mil_loss(out, labels, recall_weight=0.5, mask=mask, reduction="none")
        engine.step(terms.total, torch.ones(3, dtype=torch.bool))
        for model, optimizer, bag, label in zip(alone, optimizers, bags, labels, strict=True):
            optimizer.zero_grad()
            mil_loss(model(bag), label, recall_weight=0.5).total.backward()
            optimizer.step()
    for r, model in enumerate(alone):
        for key, value in model.state_dict().items():
            # softmax ignores this bias: its gradient is rounding noise, which Adam scales up
            if key == "attention_w.bias":
                continue
            torch.testing.assert_close(engine.replica_state(r)[key], value, rtol=1e-9, atol=1e-10)


def test_a_sitting_out_replica_is_left_untouched() -> None:
    torch.manual_seed(0)
    models = [create_model("loss_attention", in_dim=4, n_classes=2, hidden_dims=(5,)) for _ in range(3)]
    engine = LockstepReplicas(models, lr=1e-2)
    x = torch.randn(7, 4)
    for step in range(3):
        before = [engine.replica_state(r) for r in range(3)]
        moments = [s["exp_avg"].clone() for s in engine.optimizer.state.values()]
        active = torch.tensor([True, step != 1, True])
        out = engine.forward(x, shared_input=True, train=True)
        engine.step(mil_loss(out, torch.ones(3, dtype=torch.long), reduction="none").total, active)
        after = [engine.replica_state(r) for r in range(3)]
        changed = [any(not torch.equal(before[r][k], after[r][k]) for k in after[r]) for r in range(3)]
        assert changed == active.tolist()
        if step == 1:
            for old, state in zip(moments, engine.optimizer.state.values(), strict=True):
                assert torch.equal(old[1], state["exp_avg"][1])


def _run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_classic_mil_quick_prints_the_table_beside_the_paper() -> None:
    out = _run("paper_classic_mil.py", "--jobs", "1")
    assert "Table 1" in out
    for name in ("MUSK1", "MUSK2", "ELEPHANT", "Loss-Attention", "0.917±0.066", "Gated attention"):
        assert name in out
    assert " yes " in out or " NO " in out  # a verdict per cell


def test_mnist_bags_quick_prints_auc_retrieval_and_ablation() -> None:
    out = _run("paper_mnist_bags.py", "--jobs", "1")
    for text in (
        "Table 2",
        "Loss-Attention",
        "Embedding + max",
        "Fig. 2",
        "threshold",
        "Ablation",
        "lambda=2",
    ):
        assert text in out


def test_a_rerun_reuses_finished_cells_and_a_changed_setting_does_not(tmp_path: Path) -> None:
    """Long paper runs resume: finished cells are stored and reused, keyed by settings and code."""
    cells = tmp_path / "cells"
    args = ("--jobs", "1", "--datasets", "MUSK1", "--methods", "mean", "max", "--cells", str(cells))
    first = _run("paper_classic_mil.py", *args)
    stored = sorted(p.name for p in cells.glob("*.json"))
    assert len(stored) == 2 and all(name.startswith("paper_classic_mil__MUSK1-") for name in stored)
    second = subprocess.run(
        [sys.executable, str(BENCHMARKS / "paper_classic_mil.py"), "--quick", *args],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert second.returncode == 0 and second.stderr.count(", cached)") == 2
    table = [line for line in first.splitlines() if line.startswith("Embedding")]
    assert table and table == [line for line in second.stdout.splitlines() if line.startswith("Embedding")]
    _run("paper_classic_mil.py", *args, "--seed", "1")  # another setting: new cells, old ones kept
    assert len(list(cells.glob("*.json"))) == 4
