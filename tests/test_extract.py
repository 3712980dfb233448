"""``wsi-mil extract`` in process: output contract, alignment, workers, manifest, reruns, R9, R11, R15, R21, R25-R27.

The process-level faults (SIGKILL, SIGINT, concurrent processes, file-size limits, memory over a long
run) are in ``test_extract_faults.py``.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from extract_helpers import (
    FAST_ARGS,
    FAST_ENCODER,
    assert_same_features,
    fast_config,
    manifest,
    read_h5,
    run_cli,
    temp_files,
    write_slide,
)

from wsi_mil.cli import main
from wsi_mil.config import ExtractConfig, load_config
from wsi_mil.errors import DuplicateSlideIdError, OutputConflictError, OutputError
from wsi_mil.features import runtime as runtime_mod
from wsi_mil.features import stream as stream_mod
from wsi_mil.features.encoders import create_encoder
from wsi_mil.runs import extract as extract_mod
from wsi_mil.runs.extract import RANDOM_INIT_SEED, run_extract
from wsi_mil.slide import Slide, choose_reader, open_slide
from wsi_mil.store.bag_file import BagWriter

pytest_plugins = ("extract_fixtures",)  # cohort, reference, one_torch_thread
pytestmark = pytest.mark.usefixtures("one_torch_thread")

IDS = ("s00", "s01", "s02", "s03")

#: every attribute the issue asks a feature file to carry, by our name
REQUIRED_ATTRS = (
    "slide_id", "source_file", "slide_mpp", "tile_mpp", "tile_px", "footprint_px", "level", "encoder_name",
    "feature_dim", "weights_sha256", "preprocessing", "reader_backend", "reader_version", "wsi_mil_version",
    "config_hash", "n_tiles", "complete",
)  # fmt: skip


def _invoke(*args: str) -> object:
    return CliRunner().invoke(main, ["-q", *args], catch_exceptions=False)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --- the output contract ---------------------------------------------------------------------------
def test_output_files_datasets_and_attributes(cohort: list[Path], reference: Path) -> None:
    assert (reference / "config.yaml").is_file() and (reference / "run.json").is_file()
    cfg = load_config(ExtractConfig, reference / "config.yaml")
    assert cfg.encoder == FAST_ENCODER and cfg.precision == "fp32"  # the resolved config
    run = yaml.safe_load((reference / "run.json").read_text())
    assert run["totals"]["by_status"] == {"done": 4} and run["totals"]["tiles"] > 0
    assert {"torch", "timm", "wsi_mil", "openslide"} <= set(run["versions"]) and run["device"].startswith("cpu")
    for path in cohort:
        sid = path.stem
        with h5py.File(reference / "features" / f"{sid}.h5", "r") as f:
            feats, coords = f["features"], f["coords"]
            assert feats.dtype == np.float32 and feats.ndim == 2 and feats.shape[1] == 64
            assert coords.dtype == np.int64 and coords.shape == (feats.shape[0], 2)
            assert feats.shape[0] >= 10
            attrs = dict(f.attrs)
            coords_np = coords[:]
        missing = [k for k in REQUIRED_ATTRS if k not in attrs]
        assert not missing, missing
        assert attrs["complete"] == True  # noqa: E712 - numpy bool
        assert attrs["slide_id"] == sid and attrs["source_file"] == path.name
        assert attrs["n_tiles"] == len(coords_np) and attrs["feature_dim"] == 64
        assert attrs["encoder_name"] == FAST_ENCODER
        assert attrs["weights_sha256"] == "random" and attrs["random_init_seed"] == RANDOM_INIT_SEED
        assert attrs["tile_px"] == 128 and attrs["tile_mpp"] == pytest.approx(0.5)
        with open_slide(path) as slide:
            assert attrs["slide_mpp"] == pytest.approx(slide.mpp)
            # level-0 footprint of a 128 px tile at 0.5 µm/px; the level read is level 0 here
            assert attrs["footprint_px"] == round(128 * 0.5 / slide.mpp)
            assert attrs["level"] == slide.best_level_for_mpp(0.5) == 0
            w0, h0 = slide.dimensions
            assert attrs["slide_fingerprint"] == slide.fingerprint().to_json()  # which file it came from
        assert attrs["reader_backend"] in ("openslide", "tiffslide") and attrs["reader_version"]
        assert attrs["config_hash"] == run["config_hash"]
        pre = yaml.safe_load(attrs["preprocessing"])
        assert pre["input_size"] == [3, 160, 160] and len(pre["mean"]) == 3
        # coords: level-0 top-left corners, unique, on the grid, inside the slide
        assert len(np.unique(coords_np, axis=0)) == len(coords_np)
        assert (coords_np >= 0).all() and (coords_np[:, 0] < w0).all() and (coords_np[:, 1] < h0).all()
        # CLAM-style readers
        with h5py.File(reference / "features" / f"{sid}.h5", "r") as f:
            assert f["coords"].attrs["patch_level"] == 0 and f["coords"].attrs["patch_size"] == attrs["footprint_px"]
    assert temp_files(reference / "features") == []
    assert sorted(p.name for p in (reference / "tissue").iterdir()) == sorted(
        f"{s}.{ext}" for s in IDS for ext in ("geojson", "png")
    )


def test_manifest_columns_and_values(reference: Path) -> None:
    rows = manifest(reference)
    assert sorted(rows) == list(IDS)
    for sid, row in rows.items():
        for col in ("status", "error_class", "error", "n_tiles", "seconds", "tiles_per_s", "read_s", "model_s"):
            assert col in row
        assert row["status"] == "done" and row["error_class"] == "" and row["error"] == ""
        _, coords, _ = read_h5(reference / "features" / f"{sid}.h5")
        assert int(row["n_tiles"]) == len(coords)
        seconds, rate = float(row["seconds"]), float(row["tiles_per_s"])
        assert seconds > 0 and rate == pytest.approx(len(coords) / seconds, rel=0.01)
        assert float(row["read_s"]) >= 0 and float(row["model_s"]) > 0
        assert float(row["read_s"]) + float(row["model_s"]) <= seconds * 1.01


def test_features_align_with_the_pixels_at_their_coords(cohort: list[Path], reference: Path) -> None:
    """The golden test: a stored row equals the encoder applied to the pixels read at its coords."""
    torch.manual_seed(RANDOM_INIT_SEED)
    encoder = create_encoder(FAST_ENCODER, random_init=True, device="cpu")
    for path in (cohort[0], cohort[1]):  # a 0.5 µm/px .tif and a 0.25 µm/px .svs (read and resized)
        feats, coords, attrs = read_h5(reference / "features" / f"{path.stem}.h5")
        pick = np.linspace(0, len(coords) - 1, 6).astype(int)
        assert attrs["reader_backend"] == "tiffslide"  # chosen for speed where it reads the same pixels
        with open_slide(path, backend=attrs["reader_backend"]) as slide:
            tiles = np.stack([slide.read_region_mpp((int(x), int(y)), (128, 128), 0.5) for x, y in coords[pick]])
            off = int(attrs["footprint_px"]) // 2  # the same tiles shifted by half a tile: must not match
            shifted = np.stack(
                [slide.read_region_mpp((int(x) + off, int(y)), (128, 128), 0.5) for x, y in coords[pick]]
            )
        expected = encoder.encode(tiles, precision="fp32").numpy()
        np.testing.assert_allclose(feats[pick], expected, atol=1e-5, rtol=1e-5)
        wrong = encoder.encode(shifted, precision="fp32").numpy()
        assert np.abs(feats[pick] - wrong).max() > 1e-2  # the test can tell a misaligned row


@pytest.mark.parametrize("workers", [2, -1], ids=["2 tile-reading processes for the run", "auto: a reading thread"])
def test_loaders_give_the_same_features(cohort: list[Path], reference: Path, tmp_path: Path, workers: int) -> None:
    """0 workers (the reference), 2 processes of the run-long reader pool, and the CPU default (a reading thread)."""
    summary = run_extract(cohort, tmp_path, fast_config(workers=workers), progress=False)
    assert summary.exit_code == 0 and summary.counts["done"] == 4
    assert_same_features(reference, tmp_path, IDS, atol=1e-5)
    run = yaml.safe_load((tmp_path / "run.json").read_text())
    assert run["loader"] == ("processes" if workers == 2 else "thread")


def test_float16_features_by_option(cohort: list[Path], reference: Path, tmp_path: Path) -> None:
    summary = run_extract(cohort[:1], tmp_path, fast_config(feature_dtype="float16"), progress=False)
    assert summary.exit_code == 0
    f16, c16, _ = read_h5(tmp_path / "features" / "s00.h5")
    f32, c32, _ = read_h5(reference / "features" / "s00.h5")
    assert f16.dtype == np.float16
    np.testing.assert_array_equal(c16, c32)
    np.testing.assert_allclose(f16.astype(np.float32), f32, atol=2e-3, rtol=2e-3)


# --- reruns ------------------------------------------------------------------------------------------
def test_rerun_skips_complete_slides(cohort: list[Path], reference: Path, tmp_path: Path, monkeypatch) -> None:
    out = _copy(reference, tmp_path / "out")
    before = {p.name: p.stat().st_ino for p in (out / "features").iterdir()}
    opened: list[str] = []
    real_prepare = extract_mod.prepare_slide
    monkeypatch.setattr(extract_mod, "prepare_slide", lambda s, *a, **k: opened.append(s.slide_id) or real_prepare(s, *a, **k))
    summary = run_extract(cohort, out, fast_config(workers=1, batch_size=5), progress=False)  # not hashed
    assert summary.exit_code == 0 and summary.counts == {"skipped": 4}
    assert opened == []
    assert {p.name: p.stat().st_ino for p in (out / "features").iterdir()} == before
    rows = manifest(out)
    assert {r["status"] for r in rows.values()} == {"skipped"}
    assert all(int(rows[s]["n_tiles"]) == int(manifest(reference)[s]["n_tiles"]) for s in IDS)


@pytest.mark.parametrize("damage", ["garbage", "foreign_hdf5", "not_complete", "short_features", "empty_file"])
def test_R11_partial_or_foreign_output_is_recomputed(
    cohort: list[Path], reference: Path, tmp_path: Path, damage: str
) -> None:
    out = _copy(reference, tmp_path / "out")
    target = out / "features" / "s01.h5"
    if damage == "garbage":
        target.write_bytes(os.urandom(5000))
    elif damage == "empty_file":
        target.write_bytes(b"")
    elif damage == "foreign_hdf5":
        target.unlink()
        with h5py.File(target, "w") as f:
            f["data"] = np.zeros(3)
            f.attrs["complete"] = True
    elif damage == "not_complete":
        with h5py.File(target, "a") as f:
            f.attrs["complete"] = False
    elif damage == "short_features":  # what a writer killed mid-append might leave, marked complete
        with h5py.File(target, "a") as f:
            f["features"].resize(f["features"].shape[0] - 3, axis=0)
    summary = run_extract(cohort, out, fast_config(), progress=False)
    assert summary.exit_code == 0
    status = {r["slide_id"]: r["status"] for r in summary.records}
    assert status == {"s00": "skipped", "s01": "done", "s02": "skipped", "s03": "skipped"}
    assert_same_features(reference, out, ["s01"])


def test_bag_from_other_weights_is_recomputed(cohort: list[Path], reference: Path, tmp_path: Path) -> None:
    out = _copy(reference, tmp_path / "out")
    with h5py.File(out / "features" / "s02.h5", "a") as f:
        f.attrs["weights_sha256"] = "0" * 64  # same config, but the weight file changed in place
    summary = run_extract(cohort, out, fast_config(), progress=False)
    assert {r["slide_id"]: r["status"] for r in summary.records}["s02"] == "done"


# --- failures and no tissue ---------------------------------------------------------------------------
def test_R9_failures_recorded_batch_goes_on_no_tissue_not_retried(
    cohort: list[Path], tmp_path: Path, monkeypatch
) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.svs").write_bytes(b"")
    (bad / "text.svs").write_text("not a slide\n")
    blank = write_slide(bad / "blank.tif", size=(1024, 768), blank=True)
    slides = [cohort[0], bad / "empty.svs", blank, bad / "text.svs", cohort[2]]
    out = tmp_path / "out"
    summary = run_extract(slides, out, fast_config(), progress=False)
    status = {r["slide_id"]: r["status"] for r in summary.records}
    assert status == {"s00": "done", "empty": "failed", "blank": "no_tissue", "text": "failed", "s02": "done"}
    assert summary.exit_code == 1  # a failure
    assert "FAILED empty" in summary.text() and "FAILED text" in summary.text()
    rows = manifest(out)
    assert rows["empty"]["error_class"] == "SlideOpenError" and "empty" in rows["empty"]["error"]
    assert rows["text"]["error_class"] == "SlideOpenError" and rows["text"]["error"]
    assert rows["blank"]["status"] == "no_tissue" and rows["blank"]["n_tiles"] == "0"
    assert "no tissue" in rows["blank"]["error"]
    assert sorted(p.name for p in (out / "features").iterdir()) == ["s00.h5", "s02.h5"]  # no bag for blank
    assert (out / "tissue" / "blank.png").is_file()  # the QC picture explains it

    # A rerun retries the failures, skips the done slides, and does not look at the blank one again.
    opened: list[str] = []
    real_open = extract_mod.SlideOpener.open
    monkeypatch.setattr(extract_mod.SlideOpener, "open", lambda self, p: opened.append(p.stem) or real_open(self, p))
    summary = run_extract(slides, out, fast_config(), progress=False)
    status = {r["slide_id"]: r["status"] for r in summary.records}
    assert status == {"s00": "skipped", "empty": "failed", "blank": "no_tissue", "text": "failed", "s02": "skipped"}
    assert sorted(opened) == ["empty", "text"]
    assert summary.counts["no_tissue"] == 1

    # Only no_tissue besides successes: exit 0.
    summary = run_extract([cohort[0], blank], tmp_path / "out2", fast_config(), progress=False)
    assert summary.exit_code == 0 and summary.counts == {"done": 1, "no_tissue": 1}


def test_exit_status_of_the_command(cohort: list[Path], tmp_path: Path) -> None:
    (tmp_path / "empty.svs").write_bytes(b"")
    res = _invoke("extract", str(cohort[0]), str(tmp_path / "empty.svs"), "--out", str(tmp_path / "o"), *FAST_ARGS)
    assert res.exit_code == 1, res.output
    assert "FAILED empty" in res.output
    res = _invoke("extract", str(cohort[0]), "--out", str(tmp_path / "o2"), *FAST_ARGS, "--workers", "0")
    assert res.exit_code == 0, res.output


# --- refusals before any work ------------------------------------------------------------------------
def _forbid_work(monkeypatch) -> None:
    def boom(*a: object, **k: object) -> None:
        raise AssertionError("a slide was opened or the encoder built")

    monkeypatch.setattr(stream_mod, "open_slide", boom)
    monkeypatch.setattr("wsi_mil.slide.readers.open_slide", boom)
    monkeypatch.setattr(extract_mod.SlideOpener, "open", boom)
    monkeypatch.setattr("wsi_mil.features.encoders.create_encoder", boom)


def _unwritable_outputs(tmp_path: Path) -> list[Path]:
    """Output paths no process can write, whatever its user (tests here often run as root)."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    outs = [a_file / "out"]  # the parent is a regular file
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        outs.append(locked / "out")
        outs.append(locked)
    for candidate in (Path("/sys/wsi-mil-test-out"), Path("/sys/kernel")):  # sysfs refuses new files, even to root
        try:
            if candidate.is_dir():
                probe = candidate / ".wsi-mil-probe"
                probe.touch()
                probe.unlink()
            else:
                candidate.mkdir()
                candidate.rmdir()
        except OSError:
            outs.append(candidate)
    return outs


def test_R15_unwritable_output_refused_before_any_slide(cohort: list[Path], tmp_path: Path, monkeypatch) -> None:
    _forbid_work(monkeypatch)
    outs = _unwritable_outputs(tmp_path)
    for out in outs:
        with pytest.raises(OutputError, match="writable") as info:
            run_extract(cohort, out, fast_config(), progress=False)
        assert str(out) in str(info.value)
    res = _invoke("extract", str(cohort[0]), "--out", str(outs[0]), *FAST_ARGS)
    assert res.exit_code == 2 and "writable --out folder" in res.output


def test_R21_duplicate_ids_refused_before_processing(tmp_path: Path, monkeypatch) -> None:
    for rel in ("a/x.svs", "b/x.svs", "x.tif", "y.tif"):
        (tmp_path / "in" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / rel).write_bytes(b"never opened")
    _forbid_work(monkeypatch)
    res = _invoke("extract", str(tmp_path / "in"), "--out", str(tmp_path / "out"), *FAST_ARGS)
    assert res.exit_code == 2
    for rel in ("a/x.svs", "b/x.svs", "x.tif"):
        assert str(tmp_path / "in" / rel) in res.output
    assert "'y'" not in res.output and not (tmp_path / "out").exists()
    with pytest.raises(DuplicateSlideIdError):  # the library function checks too
        run_extract([tmp_path / "in" / "a/x.svs", tmp_path / "in" / "x.tif"], tmp_path / "out", fast_config())


def test_R25_other_config_refused_unless_overwrite(cohort: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_extract(cohort[:1], out, fast_config(), progress=False).exit_code == 0
    res = _invoke("extract", str(cohort[0]), "--out", str(out), *FAST_ARGS, "--mpp", "1.0")
    assert res.exit_code == 2
    assert "another configuration" in res.output and "tiling" in res.output and "--overwrite" in res.output
    with pytest.raises(OutputConflictError):
        run_extract(cohort[:1], out, fast_config(tiling={"tile_px": 96}), progress=False)
    # settings that do not change the outputs are not a conflict
    assert run_extract(cohort[:1], out, fast_config(batch_size=3, workers=1), progress=False).counts == {"skipped": 1}
    summary = run_extract(cohort[:1], out, fast_config(tiling={"tile_px": 96}), overwrite=True, progress=False)
    assert summary.counts == {"done": 1}
    _, _, attrs = read_h5(out / "features" / "s00.h5")
    assert attrs["tile_px"] == 96
    assert load_config(ExtractConfig, out / "config.yaml").tiling.tile_px == 96


def test_R26_unknown_config_key_named(cohort: list[Path], tmp_path: Path) -> None:
    cfg = tmp_path / "extract.yaml"
    cfg.write_text("encoder: test_convnext\ntiling:\n  mpp: 0.5\n  tile_size: 128\nbatchsize: 4\n")
    res = _invoke("extract", str(cohort[0]), "--out", str(tmp_path / "out"), "--config", str(cfg))
    assert res.exit_code == 2
    assert "unknown key 'tiling.tile_size'" in res.output and "unknown key 'batchsize'" in res.output
    assert not (tmp_path / "out").exists()


def test_R27_hdf5_lock_failure_suggests_the_variable(cohort: list[Path], tmp_path: Path, monkeypatch) -> None:
    def locked(*a: object, **k: object) -> None:
        raise OSError(
            "Unable to synchronously create file (unable to lock file, errno = 37, error message = 'No locks available')"
        )

    monkeypatch.setattr(h5py, "File", locked)
    with pytest.raises(OutputError, match="HDF5_USE_FILE_LOCKING=FALSE"):
        run_extract(cohort[:1], tmp_path / "out", fast_config(), progress=False)
    assert temp_files(tmp_path / "out" / "features") == []
    res = _invoke("extract", str(cohort[0]), "--out", str(tmp_path / "out2"), *FAST_ARGS)
    assert res.exit_code == 2 and "HDF5_USE_FILE_LOCKING=FALSE" in res.output


def test_R16_nan_features_refused_by_the_writer_and_the_run(cohort: list[Path], tmp_path: Path, monkeypatch) -> None:
    dest = tmp_path / "f" / "x.h5"
    with pytest.raises(Exception, match="NaN/Inf") as info, BagWriter(dest, 4, {"slide_id": "x"}) as writer:
        writer.append(np.ones((2, 4), np.float32), np.zeros((2, 2)))
        feats = np.ones((3, 4), np.float32)
        feats[1, 2] = np.nan
        writer.append(feats, np.array([[0, 0], [256, 512], [512, 0]]))
    assert "(256, 512)" in str(info.value) and "x" in str(info.value)
    assert not dest.exists() and temp_files(dest.parent) == []

    # In a run the slide fails (named, recorded), no file is left, and the batch goes on.
    real = BagWriter.append

    def poisoned(self: BagWriter, features: np.ndarray, coords: np.ndarray) -> None:
        if self.dest.stem == "s00":
            features = features.copy()
            features[0, 0] = np.inf
        real(self, features, coords)

    monkeypatch.setattr(BagWriter, "append", poisoned)
    summary = run_extract(cohort[:2], tmp_path / "out", fast_config(), progress=False)
    status = {r["slide_id"]: (r["status"], r.get("error_class")) for r in summary.records}
    assert status == {"s00": ("failed", "BagFileError"), "s01": ("done", None)}
    assert not (tmp_path / "out" / "features" / "s00.h5").exists()
    assert temp_files(tmp_path / "out" / "features") == []


def test_missing_weights_file_fails_at_once(cohort: list[Path], tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "encoder.safetensors"
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError) as info:  # WeightsError is a FileNotFoundError
        run_extract(cohort[:1], tmp_path / "out", fast_config(random_init=False, weights=str(missing)))
    assert time.perf_counter() - t0 < 5
    assert str(missing) in str(info.value)
    # nothing recorded, so fixing the path and rerunning into the same folder is not a "config conflict"
    assert not (tmp_path / "out" / "config.yaml").exists()

    r = run_cli("extract", str(cohort[0]), "--out", str(tmp_path / "out"), "--encoder", FAST_ENCODER,
                "--weights", str(missing), timeout=120)  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "WeightsError" in r.stderr and str(missing) in r.stderr
    assert r.stderr.count("error:") == 1 and "Traceback" not in r.stderr


def test_R22_unicode_and_spaces_end_to_end(tmp_path: Path) -> None:
    src = write_slide(tmp_path / "slides ü 測試" / "Schnitt 1 – ß.tif", seed=5)
    out = tmp_path / "out é 2"
    r = run_cli("extract", str(src.parent), "--out", str(out), *FAST_ARGS, "--workers", "1", timeout=180)
    assert r.returncode == 0, r.stderr
    feats, coords, attrs = read_h5(out / "features" / "Schnitt 1 – ß.h5")
    assert len(feats) == len(coords) > 0 and attrs["slide_id"] == "Schnitt 1 – ß"
    assert manifest(out)["Schnitt 1 – ß"]["status"] == "done"
    assert (out / "tissue" / "Schnitt 1 – ß.png").is_file()


@pytest.mark.parametrize(
    "env", [{"SLURM_ARRAY_TASK_ID": "{i}", "SLURM_ARRAY_TASK_COUNT": "2"}, {"JOB_COMPLETION_INDEX": "{i}", "WSI_MIL_SHARDS": "2"}]
)
def test_shard_defaults_from_the_scheduler(cohort: list[Path], tmp_path: Path, monkeypatch, env: dict[str, str]) -> None:
    """A Slurm array task or a Kubernetes indexed-job pod picks its shard from the environment, unchanged."""
    from wsi_mil.runs.slide_loop import shard_of

    out = tmp_path / "out"
    for i in range(2):
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value.format(i=i))
            res = _invoke("extract", *map(str, cohort), "--out", str(out), *FAST_ARGS, "--workers", "0")
        assert res.exit_code == 0, res.output
        runs = yaml.safe_load((out / f"run.shard-{i}-of-2.json").read_text())
        assert runs["shard"] == [i, 2]
        mine = sorted(p.stem for p in cohort if shard_of(p.stem, 2) == i)
        assert runs["totals"]["by_status"] == ({"done": len(mine)} if mine else {})
    assert sorted(p.stem for p in (out / "features").glob("*.h5")) == list(IDS)


def test_reader_choice(cohort: list[Path], monkeypatch) -> None:
    """tiffslide reads TIFF/SVS slides only when it sees the same pyramid and decodes the same pixels."""
    with open_slide(cohort[1]) as slide:  # .svs, OpenSlide by default
        assert slide.backend_name == "openslide"
        chosen = choose_reader(slide, "auto")
        assert chosen.backend_name == "tiffslide" and chosen.mpp == slide.mpp
        assert chosen.mpp_source == slide.mpp_source == "metadata"
        chosen.close()
        assert choose_reader(slide, "openslide") is slide
        real = Slide.read_region

        def off_by_one(self, *a, **k):  # another decoder: one grey level apart
            out = real(self, *a, **k)
            return out + 1 if self.backend_name == "tiffslide" else out

        monkeypatch.setattr(Slide, "read_region", off_by_one)
        assert choose_reader(slide, "auto") is slide


def test_interrupt_before_the_batch_exits_130(cohort: list[Path], tmp_path: Path, monkeypatch) -> None:
    def interrupted(*a: object, **k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("wsi_mil.features.encoders.create_encoder", interrupted)  # Ctrl-C while the model loads
    res = _invoke("extract", str(cohort[0]), "--out", str(tmp_path / "out"), *FAST_ARGS)
    assert res.exit_code == 130 and "interrupted" in res.output
    assert not (tmp_path / "out" / "config.yaml").exists()


def _corrupt_tile_at(path: Path, x: int, y: int) -> None:
    """Zero the middle of the level-0 JPEG tile holding level-0 pixel (x, y)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        per_row = -(-page.imagewidth // page.tilewidth)
        index = (y // page.tilelength) * per_row + x // page.tilewidth
        offset, count = page.dataoffsets[index], page.databytecounts[index]
    with open(path, "r+b") as fh:
        fh.seek(offset + 20)
        fh.write(bytes(count - 40))


@pytest.mark.parametrize("workers", [-1, 0, 2])
def test_a_corrupt_tile_fails_its_slide_or_is_skipped_on_request(tmp_path: Path, workers: int) -> None:
    # large enough that tissue detection and the QC picture read a coarser level than the broken one
    good = write_slide(tmp_path / "in" / "good.tif", seed=3, mpp=0.25, upscale=2)
    assert run_extract([good], tmp_path / "first", fast_config(), progress=False).exit_code == 0
    _, coords, _ = read_h5(tmp_path / "first" / "features" / "good.h5")
    bad = tmp_path / "in" / "bad.tif"
    shutil.copy(good, bad)
    _corrupt_tile_at(bad, *(int(v) + 8 for v in coords[len(coords) // 2]))  # inside a tissue tile
    summary = run_extract([bad, good], tmp_path / "out", fast_config(workers=workers), progress=False)
    status = {r["slide_id"]: r for r in summary.records}
    assert status["good"]["status"] == "done"
    assert status["bad"]["status"] == "failed" and status["bad"]["error_class"] == "SlideReadError"
    assert "level-0" in status["bad"]["error"] and summary.exit_code == 1
    assert not (tmp_path / "out" / "features" / "bad.h5").exists()
    summary = run_extract(
        [bad], tmp_path / "out2", fast_config(workers=workers, skip_unreadable_tiles=True), progress=False
    )
    (record,) = summary.records
    assert record["status"] == "done" and record["n_skipped_tiles"] >= 1
    _, coords, attrs = read_h5(tmp_path / "out2" / "features" / "bad.h5")
    assert attrs["n_skipped_tiles"] == record["n_skipped_tiles"] and len(coords) == record["n_tiles"]


def test_threads_follow_omp_and_container_quota(monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime_mod, "_cgroup_cpu_limit", lambda: 1.5)  # docker run --cpus 1.5
    assert runtime_mod.available_cpus() == 1 and runtime_mod.resolve_threads() == 1
    monkeypatch.setattr(runtime_mod, "_cgroup_cpu_limit", lambda: None)
    assert runtime_mod.resolve_threads() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runtime_mod.resolve_threads() == 3 and runtime_mod.resolve_threads(5) == 5
    before = torch.get_num_threads()
    with runtime_mod.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


# --- row reads ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("slide_mpp", [0.25, 0.2631, 0.499, 0.5])
@pytest.mark.parametrize("overlap", [False, True])
def test_row_reads_equal_tile_reads(make_slide, slide_mpp: float, overlap: bool) -> None:
    """Tiles read a row at a time (one read per run of touching footprints, integral scale or not) are
    pixel-identical to reading each tile on its own, and the rows really are read together."""
    from wsi_mil.features.stream import TileBatches, TileSource

    path = make_slide(f"rows_{slide_mpp}", mpp=slide_mpp, size=(1600, 1200))
    footprint = 64 * 0.5 / slide_mpp
    step = round(footprint * (0.75 if overlap else 1.0))
    xs = np.arange(0, 1600 - 2 * footprint, step, dtype=np.int64)
    grid = [(x, y) for y in (0, 3 * step, 5 * step) for x in xs if not (y == 0 and x == xs[2])]  # a gap
    coords = np.array(grid, dtype=np.int64)
    source = TileSource(path=str(path), backend="tiffslide", slide_mpp=slide_mpp, max_slide_px=10**10,
                        max_read_px=10**9, mpp=0.5, tile_px=64, skip_unreadable=False)  # fmt: skip
    dataset = TileBatches(source, coords)
    calls = 0
    slide = dataset._handle()
    original = slide.read_region

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    slide.read_region = counting  # type: ignore[method-assign]
    batch = dataset[list(range(len(coords)))]["tiles"].numpy()
    assert calls <= 4 < len(coords)  # three rows, one broken by the gap
    slide.read_region = original  # type: ignore[method-assign]
    for i in range(len(coords)):
        np.testing.assert_array_equal(batch[i], dataset.read_tile(i), err_msg=f"tile {i} at {coords[i]}")
    dataset.close()


def test_corrupt_tile_met_by_tissue_detection_fails_naming_it_or_is_skipped_on_request(tmp_path: Path) -> None:
    """R4 for the sample cohort's broken slide, whose corrupt tile is met already by the whole-level
    tissue/QC reads: by default the slide fails naming the tile; with skip_unreadable_tiles it is done."""
    from wsi_mil.demo.broken import write_broken_slides

    bad = write_broken_slides(tmp_path / "broken")["corrupt_tile"]
    summary = run_extract([bad], tmp_path / "strict", fast_config(), progress=False)
    (record,) = summary.records
    assert record["status"] == "failed" and record["error_class"] == "SlideReadError"
    assert "level-0" in record["error"] and summary.exit_code == 1
    summary = run_extract([bad], tmp_path / "tolerant", fast_config(skip_unreadable_tiles=True), progress=False)
    (record,) = summary.records
    assert record["status"] == "done", record
    _, coords, attrs = read_h5(tmp_path / "tolerant" / "features" / f"{bad.stem}.h5")
    assert attrs["n_skipped_segmentation_tiles"] >= 1 and len(coords) == record["n_tiles"] > 0


def test_batch_size_default_by_device_and_forward_passes() -> None:
    """null batch size: 8 on CPU, 128 on CUDA; tiles read together run as full batches, then the rest
    in powers of two (a bounded set of input shapes over a whole run)."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert runtime_mod.resolve_batch_size(None, cpu) == 8 and runtime_mod.resolve_batch_size(None, cuda) == 128
    assert runtime_mod.resolve_batch_size(5, cuda) == 5
    assert stream_mod.model_batches(32, 8) == [8, 8, 8, 8]
    assert stream_mod.model_batches(19, 16) == [16, 2, 1]
    assert stream_mod.model_batches(37, 8) == [8, 8, 8, 8, 4, 1]
    shapes = {s for n in range(1, 200) for s in stream_mod.model_batches(n, 8)}
    assert shapes == {1, 2, 4, 8}
    assert all(sum(stream_mod.model_batches(n, b)) == n for n in range(1, 70) for b in (1, 3, 8, 32))


def test_the_resolved_batch_size_is_recorded(cohort: list[Path], tmp_path: Path) -> None:
    cfg = fast_config().model_copy(update={"batch_size": None})
    assert run_extract(cohort[:1], tmp_path / "out", cfg, progress=False).exit_code == 0
    assert load_config(ExtractConfig, tmp_path / "out" / "config.yaml").batch_size == 8


def test_quiet_reports_each_failed_slide_once(tmp_path: Path) -> None:
    from wsi_mil.demo.broken import write_broken_slides

    broken = write_broken_slides(tmp_path / "broken")
    failing = [broken[k] for k in ("zero_bytes", "not_a_slide", "truncated")]
    result = run_cli("-q", "extract", *map(str, failing), "--out", str(tmp_path / "out"), *FAST_ARGS)
    assert result.returncode == 1, result.stderr
    output = result.stdout + result.stderr
    for path in failing:  # one line per failed slide (its message names the file too)
        assert sum(path.stem in line for line in output.splitlines()) == 1, output
