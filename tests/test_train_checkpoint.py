"""Checkpoints: safetensors + sidecar round trip, safe loading (R23), integrity, resolution of paths."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

from wsi_mil.cohort.datasets import BagSource, inspect_bag
from wsi_mil.errors import BagFileError, CheckpointError
from wsi_mil.mil import create_model
from wsi_mil.store.bag_file import FeatureSpec
from wsi_mil.store.checkpoint import load_checkpoint, resolve_checkpoints, save_checkpoint

SPEC = FeatureSpec("enc", 12, 0.5, 224, "cd" * 32, "0.1.0")


class SideEffect:
    """Unpickling this touches a marker file: what a malicious checkpoint would do."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _saved(tmp_path, name="abmil"):
    torch.manual_seed(0)
    model = create_model(name, 12, 3, hidden_dims=(16,), dropout=0.1)
    sidecar = save_checkpoint(tmp_path / "fold_0", model, ["a", "b", "c"], SPEC, training={"fold": 0})
    return model, sidecar


def test_round_trip_rebuilds_the_same_model(tmp_path):
    model, sidecar = _saved(tmp_path)
    assert sorted(p.name for p in sidecar.parent.iterdir()) == ["model.json", "model.safetensors"]
    meta = json.loads(sidecar.read_text())
    assert meta["model"]["name"] == "abmil" and meta["classes"] == ["a", "b", "c"]
    assert meta["feature_spec"] == SPEC.to_json() and meta["training"] == {"fold": 0}
    x = torch.randn(30, 12)
    model.eval()
    for path in (sidecar, sidecar.parent, sidecar.parent / "model.safetensors"):
        loaded = load_checkpoint(path)
        assert loaded.classes == ["a", "b", "c"] and loaded.feature_spec == SPEC
        assert not loaded.model.training
        with torch.no_grad():
            torch.testing.assert_close(loaded.model(x).bag_logits, model(x).bag_logits)


def test_a_pickled_object_with_side_effects_is_refused_and_never_runs(tmp_path):
    _, sidecar = _saved(tmp_path)
    marker = tmp_path / "pwned"
    evil = tmp_path / "fold_0" / "model.pt"
    state = dict(create_model("abmil", 12, 3, hidden_dims=(16,), dropout=0.1).state_dict())
    torch.save({"state_dict": state, "payload": SideEffect(marker)}, evil)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(sidecar, weights=evil)
    assert not marker.exists()
    # the same for a CLAM-style .pt feature bag
    torch.save(SideEffect(marker), tmp_path / "bag.pt")
    with pytest.raises(BagFileError, match="refused to load"):
        inspect_bag(BagSource("bag", tmp_path / "bag.pt", "pt", "pt"))
    assert not marker.exists()


def test_plain_pt_state_dict_loads_with_weights_only(tmp_path):
    model, sidecar = _saved(tmp_path)
    pt = tmp_path / "fold_0" / "model.pt"
    torch.save(model.state_dict(), pt)
    loaded = load_checkpoint(sidecar, weights=pt)
    x = torch.randn(5, 12)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x).bag_logits, model(x).bag_logits)


def test_tampered_or_mismatched_weights_are_refused(tmp_path):
    _, sidecar = _saved(tmp_path)
    weights = sidecar.parent / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(sidecar)
    meta = json.loads(sidecar.read_text())
    meta["weights_file"] = "../elsewhere.safetensors"
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="file name beside it"):
        load_checkpoint(sidecar)
    # weights of another architecture
    other = tmp_path / "other.pt"
    torch.save(create_model("loss_attention", 12, 3, hidden_dims=(16,)).state_dict(), other)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(_saved(tmp_path / "x")[1], weights=other)


def test_resolve_run_folder_fold_folder_and_files(tmp_path):
    model = create_model("loss_attention", 12, 2, hidden_dims=(8,))
    for k in (0, 1, 10, 2):
        save_checkpoint(tmp_path / "run" / f"fold_{k}", model, ["x", "y"], SPEC)
    run = tmp_path / "run"
    assert [p.parent.name for p in resolve_checkpoints([run])] == ["fold_0", "fold_1", "fold_2", "fold_10"]
    assert resolve_checkpoints([run / "fold_1"]) == [run / "fold_1" / "model.json"]
    assert resolve_checkpoints([run / "fold_1" / "model.safetensors", run / "fold_1"]) == [run / "fold_1" / "model.json"]
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        resolve_checkpoints([tmp_path])
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoints([tmp_path / "nope"])
