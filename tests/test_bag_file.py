"""Feature bag files: streamed atomically, validated before trusted (R11, R16, R27, R28)."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from wsi_mil.errors import BagFileError, OutputError
from wsi_mil.store.bag_file import BagWriter, bag_is_complete, load_bag, read_bag_attrs, writer_checked_finite

ATTRS = {"slide_id": "s1", "footprint_px": 512, "config_hash": "abc", "preprocessing": {"mean": [0.5] * 3}}


def _write(dest: Path, n: int = 70, dim: int = 16, **kw: object) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(n, dim)).astype(np.float32)
    coords = rng.integers(0, 10_000, size=(n, 2))
    with BagWriter(dest, dim, ATTRS, **kw) as writer:  # type: ignore[arg-type]
        for i in range(0, n, 32):
            writer.append(feats[i : i + 32], coords[i : i + 32])
        writer.append(np.empty((0, dim), np.float32), np.empty((0, 2)))
    return feats, coords


def test_round_trip_layout_and_attributes(tmp_path: Path) -> None:
    dest = tmp_path / "features" / "s1.h5"
    feats, coords = _write(dest, expected_rows=70)
    assert sorted(os.listdir(dest.parent)) == ["s1.h5"]
    f, c, attrs = load_bag(dest, check_finite=True)
    np.testing.assert_array_equal(f, feats)
    np.testing.assert_array_equal(c, coords)
    assert attrs["complete"] is True and attrs["n_tiles"] == 70 and attrs["feature_dim"] == 16
    assert attrs["slide_id"] == "s1" and attrs["preprocessing"] == '{"mean": [0.5, 0.5, 0.5]}'
    with h5py.File(dest) as h5:
        assert h5["features"].dtype == np.float32 and h5["coords"].dtype == np.int64
        assert h5["features"].chunks[1] == 16 and h5["coords"].attrs["patch_size"] == 512
    assert bag_is_complete(dest, "abc") and not bag_is_complete(dest, "other")
    assert not bag_is_complete(dest, "abc", require={"weights_sha256": "x"})


def test_the_writer_records_that_it_checked_every_value(tmp_path: Path) -> None:
    """``values_checked="finite"`` on every bag BagWriter writes (float32, float16, empty), whatever the caller's
    attributes say; a bag whose writer did not record it is not taken as checked."""
    for name, kw in (("f32.h5", {}), ("f16.h5", {"feature_dtype": "float16"}), ("empty.h5", {"n": 0})):
        _write(tmp_path / name, **kw)  # type: ignore[arg-type]
        attrs = read_bag_attrs(tmp_path / name)
        assert attrs["values_checked"] == "finite" and writer_checked_finite(attrs), name
    with BagWriter(tmp_path / "claims.h5", 2, {**ATTRS, "values_checked": "nothing"}) as writer:
        writer.append(np.ones((1, 2), np.float32), np.zeros((1, 2)))
    assert read_bag_attrs(tmp_path / "claims.h5")["values_checked"] == "finite"
    with h5py.File(tmp_path / "foreign.h5", "w") as h5:  # CLAM/TRIDENT or an older wsi-mil
        h5.create_dataset("features", data=np.ones((1, 2), np.float32))
        h5.create_dataset("coords", data=np.zeros((1, 2), np.int64))
    assert not writer_checked_finite(read_bag_attrs(tmp_path / "foreign.h5"))
    assert not writer_checked_finite({"values_checked": b"other"}) and writer_checked_finite({"values_checked": b"finite"})


def test_float16_option_and_overflow(tmp_path: Path) -> None:
    dest = tmp_path / "h.h5"
    feats, _ = _write(dest, feature_dtype="float16")
    f, _, _ = load_bag(dest)
    with h5py.File(dest) as h5:
        assert h5["features"].dtype == np.float16
    np.testing.assert_allclose(f, feats, rtol=1e-3, atol=1e-3)
    with pytest.raises(BagFileError, match="float16"), BagWriter(tmp_path / "o.h5", 2, ATTRS, feature_dtype="float16") as w:
        w.append(np.array([[1e6, 0]], np.float32), np.zeros((1, 2)))
    assert os.listdir(tmp_path) == ["h.h5"]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_R16_non_finite_features_are_refused_at_write_time(tmp_path: Path, bad: float) -> None:
    dest = tmp_path / "s1.h5"
    feats = np.ones((4, 3), np.float32)
    feats[2, 1] = bad
    with pytest.raises(BagFileError, match=r"NaN/Inf.*\(7, 8\)"), BagWriter(dest, 3, ATTRS) as w:
        w.append(feats, np.array([[1, 2], [3, 4], [7, 8], [9, 9]]))
    assert os.listdir(tmp_path) == []


def test_shape_mismatches_are_refused(tmp_path: Path) -> None:
    with pytest.raises(BagFileError, match="dimension"), BagWriter(tmp_path / "a.h5", 3, ATTRS) as w:
        w.append(np.ones((2, 4), np.float32), np.zeros((2, 2)))
    with pytest.raises(BagFileError, match="coords"), BagWriter(tmp_path / "a.h5", 3, ATTRS) as w:
        w.append(np.ones((2, 3), np.float32), np.zeros((3, 2)))
    assert os.listdir(tmp_path) == []


def test_an_interrupted_writer_leaves_the_previous_file(tmp_path: Path) -> None:
    dest = tmp_path / "s1.h5"
    feats, _ = _write(dest)
    with pytest.raises(KeyboardInterrupt), BagWriter(dest, 16, ATTRS) as w:
        w.append(np.zeros((5, 16), np.float32), np.zeros((5, 2)))
        raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["s1.h5"]
    np.testing.assert_array_equal(load_bag(dest)[0], feats)


def test_no_room_fails_before_anything_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.statvfs

    class Full:
        def __init__(self, st: os.statvfs_result) -> None:
            self.f_frsize, self.f_bavail = st.f_frsize, 10

    monkeypatch.setattr(os, "statvfs", lambda p: Full(real(p)))
    with pytest.raises(OutputError, match="No space left") as info, BagWriter(tmp_path / "s1.h5", 1024, ATTRS, expected_rows=5000):
        raise AssertionError("not reached")
    assert str(tmp_path) in str(info.value) and os.listdir(tmp_path) == []


def test_R11_partial_foreign_or_garbage_files_are_never_taken_as_done(tmp_path: Path) -> None:
    good = tmp_path / "good.h5"
    _write(good)
    assert bag_is_complete(good)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(os.urandom(4096))
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["images"] = np.zeros((2, 2))
        f.attrs["complete"] = True
    unfinished = tmp_path / "unfinished.h5"
    unfinished.write_bytes(good.read_bytes())
    with h5py.File(unfinished, "a") as f:
        f.attrs["complete"] = False
    for path in (garbage, truncated, foreign, unfinished, tmp_path / "absent.h5", tmp_path):
        assert not bag_is_complete(path), path
    with pytest.raises(BagFileError, match="not a feature bag"):
        read_bag_attrs(foreign)
    with pytest.raises(BagFileError, match="unreadable or partial"):
        read_bag_attrs(truncated)


def test_R28_features_and_coords_of_different_length(tmp_path: Path) -> None:
    path = tmp_path / "case_17.h5"
    with h5py.File(path, "w") as f:
        f["features"] = np.zeros((5, 8), np.float32)
        f["coords"] = np.zeros((4, 2), np.int64)
        f.attrs.update(slide_id="case_17", complete=True, n_tiles=5)
    with pytest.raises(BagFileError, match=r"slide 'case_17' has 5 feature rows but 4 coords"):
        load_bag(path)
    assert not bag_is_complete(path)


def test_R27_lock_failure_when_reading_names_the_remedy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s1.h5"
    _write(path)

    def locked(*a: object, **k: object) -> None:
        raise OSError("Unable to synchronously open file (unable to lock file, errno = 37, error message = 'No locks available')")

    monkeypatch.setattr(h5py, "File", locked)
    for call in (lambda: load_bag(path), lambda: read_bag_attrs(path), lambda: BagWriter(tmp_path / "n.h5", 2, ATTRS).__enter__()):
        with pytest.raises(OutputError, match="HDF5_USE_FILE_LOCKING=FALSE"):
            call()
    assert sorted(os.listdir(tmp_path)) == ["s1.h5"]
