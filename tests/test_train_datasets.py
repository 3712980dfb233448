"""Feature folders (wsi-mil, CLAM, TRIDENT) and lazy bag loading; R16, R17, R28 at scan time."""

from __future__ import annotations

import logging
import resource

import h5py
import numpy as np
import pytest
import torch
from _train_data import ENCODER, bag_attrs, write_bag

from wsi_mil.cohort.datasets import (
    FeatureSpec,
    LazyBagDataset,
    check_spec,
    cohort_spec,
    discover_features,
    inspect_bag,
    read_features,
    scan_bags,
)
from wsi_mil.errors import BagFileError, FeatureSpecMismatchError, InputError


def _raw_h5(path, features, coords=None, attrs=None, coords_attrs=None):
    """A bag written with h5py directly (bypassing BagWriter's checks), like foreign tools do."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=features)
        if coords is not None:
            ds = f.create_dataset("coords", data=coords)
            for k, v in (coords_attrs or {}).items():
                ds.attrs[k] = v
        for k, v in (attrs or {}).items():
            f.attrs[k] = v
    return path


def test_wsi_mil_layout_from_out_folder_or_features_folder(tmp_path):
    rng = np.random.default_rng(0)
    for sid in ("007", "b"):
        write_bag(tmp_path / "out" / "features" / f"{sid}.h5", rng.normal(size=(5, 8)).astype(np.float32))
    (tmp_path / "out" / "features" / ".tmp-c.h5.123").write_bytes(b"partial")
    for root in (tmp_path / "out", tmp_path / "out" / "features"):
        folder = discover_features(root)
        assert folder.layout == "wsi-mil" and sorted(folder.sources) == ["007", "b"]
    info = inspect_bag(folder.sources["007"])
    assert info.n_tiles == 5 and info.finite is True
    assert info.spec == FeatureSpec(ENCODER, 8, 0.5, 224, "ab" * 32, info.spec.wsi_mil_version)
    assert info.footprint_px == 448 and info.slide_mpp == 0.25


def test_clam_layout_h5_and_pt(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 4)).astype(np.float32)
    _raw_h5(tmp_path / "clam" / "h5_files" / "a.h5", x, np.zeros((6, 2), np.int64), coords_attrs={"patch_size": 256, "patch_level": 0})
    (tmp_path / "clam" / "pt_files").mkdir()
    torch.save(torch.from_numpy(x), tmp_path / "clam" / "pt_files" / "a.pt")
    torch.save(torch.from_numpy(x[:3]), tmp_path / "clam" / "pt_files" / "b.pt")
    folder = discover_features(tmp_path / "clam")
    assert folder.layout == "clam"
    assert folder.sources["a"].kind == "h5" and folder.sources["b"].kind == "pt"  # h5 wins (has coords)
    a, b = inspect_bag(folder.sources["a"]), inspect_bag(folder.sources["b"])
    assert a.footprint_px == 256 and a.spec.encoder_name is None and a.spec.feature_dim == 4
    assert b.n_tiles == 3 and not b.has_coords
    np.testing.assert_array_equal(read_features(folder.sources["b"]), x[:3])


def test_trident_layout(tmp_path):
    job = tmp_path / "job" / "20x_256px_0px_overlap"
    coords_attrs = {"patch_size": 256, "patch_size_level0": 512, "target_magnification": 20, "level0_magnification": 40}
    for name in ("x", "y"):
        _raw_h5(job / "features_uni_v1" / f"{name}.h5", np.ones((3, 1024), np.float32), np.zeros((3, 2), np.int64), coords_attrs=coords_attrs)
    for root in (tmp_path / "job", job, job / "features_uni_v1"):
        folder = discover_features(root)
        assert folder.layout == "trident" and sorted(folder.sources) == ["x", "y"]
    info = inspect_bag(folder.sources["x"])
    assert info.spec.encoder_name == "uni_v1" and info.spec.mpp == 0.5 and info.spec.tile_px == 256
    assert info.footprint_px == 512 and info.slide_mpp == 0.25
    _raw_h5(job / "features_conch_v15" / "x.h5", np.ones((3, 768), np.float32), np.zeros((3, 2), np.int64))
    with pytest.raises(InputError, match="several encoders"):
        discover_features(job)


def test_nothing_found_says_what_to_do(tmp_path):
    with pytest.raises(InputError, match="wsi-mil extract"):
        discover_features(tmp_path)


def test_lazy_dataset_reads_one_bag_per_item_and_subsamples_sorted_rows(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20_000, 16)).astype(np.float32)
    write_bag(tmp_path / "f" / "big.h5", x, dtype="float16")
    source = discover_features(tmp_path / "f").sources["big"]
    ds = LazyBagDataset([source], [1], n_tiles=[20_000], max_instances=1000)
    torch.manual_seed(0)
    bag = ds[0]
    assert bag.features.dtype == torch.float32 and bag.features.shape == (1000, 16) and bag.label == 1
    rows = bag.tile_index.numpy()
    assert np.all(np.diff(rows) > 0) and rows.min() >= 0 and rows.max() < 20_000
    np.testing.assert_allclose(bag.features.numpy(), x[rows].astype(np.float16).astype(np.float32))
    assert not torch.equal(ds[0].tile_index, bag.tile_index)  # a new draw per call
    full = LazyBagDataset([source], [None])[0]
    assert full.tile_index is None and full.features.shape == (20_000, 16)


def test_a_bag_of_100000_tiles(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100_000, 64)).astype(np.float32)
    write_bag(tmp_path / "f" / "huge.h5", x)
    source = discover_features(tmp_path / "f").sources["huge"]
    info = inspect_bag(source)
    assert info.n_tiles == 100_000 and info.finite
    rss_before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    bag = LazyBagDataset([source], [0])[0]
    assert bag.features.shape == (100_000, 64)
    from wsi_mil.mil import create_model

    model = create_model("loss_attention", 64, 2, hidden_dims=(32,))
    out = model(bag.features)
    assert torch.isfinite(out.bag_logits).all()
    assert out.attention.sum().item() == pytest.approx(1.0, abs=1e-4)
    growth_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before_mb
    assert growth_mb < 300  # features 25 MB + activations; nothing cohort-sized


def test_scan_leaves_out_empty_and_non_finite_bags(tmp_path, caplog):
    rng = np.random.default_rng(0)
    f = tmp_path / "f"
    write_bag(f / "ok.h5", rng.normal(size=(4, 8)).astype(np.float32))
    write_bag(f / "empty.h5", np.zeros((0, 8), np.float32))
    bad = rng.normal(size=(10_000, 8)).astype(np.float32)
    bad[9_999, 3] = np.inf
    _raw_h5(f / "nan.h5", bad, np.zeros((10_000, 2), np.int64), attrs={**bag_attrs("nan", 8), "complete": True})
    sources = list(discover_features(f).sources.values())
    with caplog.at_level(logging.WARNING):
        scan = scan_bags(sources, check_finite=True, strict=False, progress=False)
    assert list(scan.infos) == ["ok"] and scan.empty == ["empty"] and scan.non_finite == ["nan"]
    assert "1 bag(s) with 0 tiles" in caplog.text and "NaN/Inf" in caplog.text and "'nan'" in caplog.text
    with pytest.raises(BagFileError, match="NaN/Inf features: 'nan'"):
        scan_bags(sources, strict=True, progress=False)


def _tamper(path, value=np.nan):
    """Write a non-finite value into a finished bag, keeping its attributes (values_checked included)."""
    with h5py.File(path, "r+") as f:
        f["features"][1, 2] = value


def test_bags_the_writer_checked_are_trusted_unless_recheck_and_the_others_are_always_scanned(tmp_path, caplog):
    rng = np.random.default_rng(0)
    f = tmp_path / "f"
    write_bag(f / "ok.h5", rng.normal(size=(5, 8)).astype(np.float32))
    _tamper(write_bag(f / "tampered.h5", rng.normal(size=(5, 8)).astype(np.float32)))
    foreign = rng.normal(size=(5, 8)).astype(np.float32)  # no values_checked: CLAM, TRIDENT, older wsi-mil
    _raw_h5(f / "foreign_ok.h5", foreign, np.zeros((5, 2), np.int64), attrs={**bag_attrs("foreign_ok", 8), "complete": True})
    foreign[4, 0] = -np.inf
    _raw_h5(f / "foreign_inf.h5", foreign, np.zeros((5, 2), np.int64), attrs={**bag_attrs("foreign_inf", 8), "complete": True})
    sources = list(discover_features(f).sources.values())

    with caplog.at_level(logging.INFO):
        trusting = scan_bags(sources, progress=False)
    assert sorted(trusting.infos) == ["foreign_ok", "ok", "tampered"]  # the tampered bag is taken on trust
    assert trusting.non_finite == ["foreign_inf"] and sorted(trusting.trusted) == ["ok", "tampered"]
    assert trusting.infos["tampered"].finite is None and trusting.infos["foreign_ok"].finite is True
    assert "2 of 4 bag(s) not scanned for NaN/Inf" in caplog.text

    rechecked = scan_bags(sources, recheck=True, progress=False)
    assert sorted(rechecked.infos) == ["foreign_ok", "ok"] and sorted(rechecked.non_finite) == ["foreign_inf", "tampered"]
    assert rechecked.trusted == [] and rechecked.infos["ok"].finite is True
    with pytest.raises(BagFileError, match="NaN/Inf features: .*'tampered'"):
        scan_bags(sources, recheck=True, strict=True, progress=False)
    with pytest.raises(BagFileError, match="NaN/Inf features: 'foreign_inf'"):  # scanned without --recheck too
        scan_bags(sources, strict=True, progress=False)
    # without the scan nothing is taken on trust or scanned
    unchecked = scan_bags(sources, check_finite=False, progress=False)
    assert len(unchecked.infos) == 4 and unchecked.trusted == [] and unchecked.non_finite == []


def test_features_and_coords_of_different_length_name_the_slide(tmp_path):
    _raw_h5(tmp_path / "f" / "slide_R28.h5", np.ones((10, 4), np.float32), np.zeros((9, 2), np.int64))
    sources = list(discover_features(tmp_path / "f").sources.values())
    with pytest.raises(BagFileError, match=r"slide 'slide_R28' .* 10 feature rows but 9 coords"):
        scan_bags(sources, progress=False)


def test_incomplete_or_corrupt_files_are_refused(tmp_path):
    f = tmp_path / "f"
    write_bag(f / "a.h5", np.ones((3, 4), np.float32))
    with h5py.File(f / "a.h5", "a") as h:
        h.attrs["complete"] = False
    (f / "b.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(BagFileError) as info:
        scan_bags(list(discover_features(f).sources.values()), progress=False)
    assert "2 feature file(s)" in str(info.value) and "'a'" in str(info.value) and "'b'" in str(info.value)


def test_spec_checks_name_expected_and_actual(tmp_path):
    rng = np.random.default_rng(0)
    write_bag(tmp_path / "f" / "a.h5", rng.normal(size=(3, 8)).astype(np.float32))
    write_bag(tmp_path / "f" / "b.h5", rng.normal(size=(3, 8)).astype(np.float32), attrs=bag_attrs("b", 8, encoder="other", mpp=1.0))
    infos = [inspect_bag(s) for s in discover_features(tmp_path / "f").sources.values()]
    with pytest.raises(FeatureSpecMismatchError) as info:
        cohort_spec(infos)
    message = str(info.value)
    assert "expected 'test_encoder', got 'other'" in message and "expected 0.5 µm/px, got 1.0 µm/px" in message
    assert "'b'" in message
    check_spec(infos[0].spec, infos[:1])  # a bag fits its own spec


@pytest.mark.slow
def test_a_bag_of_100000_tiles_by_1024_features_trains(tmp_path):
    """One training step and one prediction on a 100,000 x 1,024 bag read lazily (400 MB of float32)."""
    from wsi_mil.mil import Trainer, TrainerConfig, create_model

    rng = np.random.default_rng(0)
    for name, label in (("huge_a", 0), ("huge_b", 1)):
        x = rng.standard_normal((100_000, 1024), dtype=np.float32)
        write_bag(tmp_path / "f" / f"{name}.h5", x, attrs=bag_attrs(name, 1024))
    del x
    folder = discover_features(tmp_path / "f")
    scan = scan_bags(list(folder.sources.values()), progress=False)
    sources = [scan.infos[s].source for s in ("huge_a", "huge_b")]
    dataset = LazyBagDataset(sources, [0, 1], n_tiles=[100_000, 100_000])
    trainer = Trainer(create_model("loss_attention", 1024, 2), TrainerConfig(epochs=2, consistency_max=1.0, rampup_epochs=1))
    result = trainer.fit(dataset)
    assert all(np.isfinite(r["train_loss"]) for r in result.history)
    prediction = trainer.predict(LazyBagDataset(sources[:1], [0]))[0]
    assert prediction.attention.shape == (100_000,) and prediction.attention.sum() == pytest.approx(1.0, abs=1e-3)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 < 6000
