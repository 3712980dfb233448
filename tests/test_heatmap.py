"""``wsi-mil heatmap``: canvas painting, scales, score files, exports, the alignment golden test, batches
and the command line. Slides and score files are generated here (``write_pyramid`` + ``write_scores``)."""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from wsi_mil.config.heatmap import HeatmapConfig
from wsi_mil.demo.pyramid import write_pyramid
from wsi_mil.errors import BagFileError, ConfigError, InputError
from wsi_mil.heatmap.export import rank_tiles
from wsi_mil.heatmap.render import (
    CanvasGeometry,
    canvas_geometry,
    clip_to_tissue,
    paint_canvas,
    rank_percentile,
    resolve_class,
    smooth,
    tile_values,
)
from wsi_mil.runs.heatmap import run_heatmap
from wsi_mil.slide import open_slide
from wsi_mil.store.geojson import tile_detections_text
from wsi_mil.store.score_file import SlideScores, find_scores, load_scores, write_scores

REPO = Path(__file__).resolve().parents[1]
MARK_RGB = (25, 35, 170)  # the distinctive tile: saturated dark blue (not removed as pen ink)
TISSUE_RGB = np.array([215, 130, 190], np.float32)


# --- generated cases -------------------------------------------------------------------------------------
@dataclass
class Case:
    slide: Path
    scores: Path
    coords: np.ndarray
    footprint: float
    mark_index: int | None
    tile_px: int
    tile_mpp: float


def make_case(
    root: Path,
    name: str,
    *,
    fmt: str = "tif",
    mpp: float = 0.25,
    size: tuple[int, int] = (3000, 2200),
    tile_px: int = 64,
    tile_mpp: float = 0.5,
    offset: tuple[int, int] = (37, 53),
    mark: tuple[int, int] | None = (7, 5),
    n_tiles: int | None = None,
    label: str = "tumor",
    bag: tuple[float, float] = (0.1, 0.9),
    seed: int = 0,
) -> Case:
    """A slide of pink tissue (one large ellipse) with a grid of tiles; tile ``mark`` (grid column, row)
    is painted dark blue on the slide and gets the highest attention and P(tumor)."""
    w, h = size
    rng = np.random.default_rng(seed)
    mask = np.zeros((h, w), np.uint8)
    cv2.ellipse(mask, (w // 2, h // 2), (int(w * 0.42), int(h * 0.42)), 0, 0, 360, 1, -1)
    img = np.full((h, w, 3), 243, np.uint8)
    tissue = np.clip(TISSUE_RGB + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
    img[mask > 0] = tissue[mask > 0]
    footprint = tile_px * tile_mpp / mpp
    step = int(round(footprint))
    xs = np.arange(offset[0], w - step, step)
    ys = np.arange(offset[1], h - step, step)
    grid = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2).astype(np.int64)
    centres = grid + step // 2
    on = mask[centres[:, 1], centres[:, 0]] > 0
    coords = grid[on]
    mark_index = None
    if mark is not None:
        mx, my = int(xs[mark[0]]), int(ys[mark[1]])
        hits = np.flatnonzero((coords[:, 0] == mx) & (coords[:, 1] == my))
        assert hits.size == 1, "the marked tile must lie on tissue"
        mark_index = int(hits[0])
        fp = int(math.floor(footprint))
        img[my : my + fp, mx : mx + fp] = MARK_RGB
    if n_tiles is not None:
        coords = coords[:n_tiles]
    (root / "slides").mkdir(parents=True, exist_ok=True)
    slide = write_pyramid(root / "slides" / f"{name}.{fmt}", img, mpp=mpp, fmt=fmt, downsamples=(1, 4, 16))  # type: ignore[arg-type]
    n = len(coords)
    logits = rng.normal(0, 1, n)
    if mark_index is not None and mark_index < n:
        logits[mark_index] = 8.0
    att = np.exp(logits) / np.exp(logits).sum() if n else np.zeros(0)
    p1 = 1 / (1 + np.exp(-logits))
    score_file = write_scores(
        root / "predict" / "scores" / f"{name}.h5", slide_id=name, coords=coords, attention=att,
        instance_probabilities=np.stack([1 - p1, p1], 1) if n else np.zeros((0, 2)),
        class_names=["normal", "tumor"], bag_probabilities=list(bag), tile_px=tile_px, mpp=tile_mpp,
        footprint_px=footprint, slide_mpp=mpp, label=label, encoder_name="test-encoder",
    )
    return Case(slide, score_file, coords, footprint, mark_index, tile_px, tile_mpp)


def fake_scores(attention: np.ndarray, probs: np.ndarray | None = None, classes: tuple[str, ...] = ("normal", "tumor"),
                predicted: str = "tumor") -> SlideScores:
    n = attention.shape[0]
    if probs is None:
        probs = np.tile(np.linspace(0, 1, len(classes))[None], (n, 1)).astype(np.float32)
    return SlideScores(
        slide_id="s", coords=np.zeros((n, 2), np.int64), attention=attention, instance_probabilities=probs,
        class_names=classes, bag_probabilities=tuple(1 / len(classes) for _ in classes), predicted_class=predicted,
        label="", model="m", n_checkpoints=1, tile_px=256, mpp=0.5, footprint_px=512.0, slide_mpp=0.25,
        encoder_name="",
    )


# --- canvas --------------------------------------------------------------------------------------------
def naive_paint(coords: np.ndarray, fp: float, values: np.ndarray, g: CanvasGeometry) -> tuple[np.ndarray, np.ndarray]:
    """Reference: loop over canvas pixel centres per tile (a tile smaller than a pixel takes its centre's pixel)."""
    total = np.zeros((g.height, g.width))
    count = np.zeros((g.height, g.width), int)
    jc = (np.arange(g.width) + 0.5) * g.downsample_x
    ic = (np.arange(g.height) + 0.5) * g.downsample_y
    for (x, y), v in zip(coords, values, strict=True):
        cols = np.flatnonzero((jc >= x) & (jc < x + fp))
        rows = np.flatnonzero((ic >= y) & (ic < y + fp))
        if cols.size == 0:
            c = int((x + fp / 2) // g.downsample_x)
            cols = np.array([c]) if 0 <= c < g.width else cols
        if rows.size == 0:
            r = int((y + fp / 2) // g.downsample_y)
            rows = np.array([r]) if 0 <= r < g.height else rows
        total[np.ix_(rows, cols)] += v
        count[np.ix_(rows, cols)] += 1
    with np.errstate(invalid="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan), count


@pytest.mark.parametrize("fp", [3.0, 40.0, 129.7])
def test_paint_canvas_matches_a_naive_reference(fp: float) -> None:
    rng = np.random.default_rng(1)
    g = canvas_geometry((1003, 707), 0.25, max_side_px=97)
    coords = rng.integers(-20, 1000, (300, 2))
    values = rng.random(300)
    mean, count = paint_canvas(coords, fp, values, g)
    ref_mean, ref_count = naive_paint(coords, fp, values, g)
    np.testing.assert_array_equal(count, ref_count)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_overlapping_tiles_are_averaged_and_unscored_area_is_nan() -> None:
    g = canvas_geometry((100, 100), 1.0, max_side_px=100)  # 1 canvas px = 1 level-0 px
    mean, count = paint_canvas(np.array([[0, 0], [10, 0]]), 20, np.array([0.0, 1.0]), g)
    assert mean[5, 5] == 0.0 and mean[5, 25] == 1.0 and mean[5, 15] == pytest.approx(0.5)
    assert count[5, 15] == 2 and count[50, 50] == 0 and math.isnan(mean[50, 50])


def test_paint_50000_tiles_is_fast() -> None:
    g = canvas_geometry((100_000, 80_000), 0.25, max_side_px=2048)
    rng = np.random.default_rng(0)
    coords = rng.integers(0, 99_000, (50_000, 2))
    t0 = time.perf_counter()
    mean, _ = paint_canvas(coords, 512.0, rng.random(50_000), g)
    assert time.perf_counter() - t0 < 2.0
    assert mean.shape == (g.height, g.width) == (1638, 2048)


def test_canvas_geometry_matches_read_downsampled(tmp_path: Path) -> None:
    img = np.full((1100, 1700, 3), 200, np.uint8)
    path = write_pyramid(tmp_path / "g.tif", img, mpp=0.5, downsamples=(1, 4))
    with open_slide(path) as slide:
        for g in (canvas_geometry(slide.dimensions, slide.mpp, max_side_px=333),
                  canvas_geometry(slide.dimensions, slide.mpp, canvas_mpp=3.3)):
            assert slide.read_downsampled(g.downsample).shape[:2] == (g.height, g.width)
        assert canvas_geometry(slide.dimensions, slide.mpp, canvas_mpp=4.0).canvas_mpp == pytest.approx(4.0, rel=0.01)
    with pytest.raises(ConfigError, match="canvas_mpp"):
        canvas_geometry((100_000, 80_000), 0.25, canvas_mpp=1.0)


def test_smoothing_keeps_unscored_area_and_constant_fields() -> None:
    heat = np.full((50, 60), np.nan, np.float32)
    heat[10:40, 10:50] = 0.7
    out = smooth(heat, 3.0)
    assert np.isnan(out[:10]).all() and np.allclose(out[10:40, 10:50], 0.7, atol=1e-5)
    heat[10:40, 10:30] = 0.0
    out = smooth(heat, 3.0)
    assert out[25, 29] > 0.05 and out[25, 30] < 0.65  # the step is blurred across


def test_clip_to_tissue_and_its_safety_net() -> None:
    heat = np.ones((10, 10), np.float32)
    tissue = np.zeros((10, 10), bool)
    tissue[:, :8] = True
    clipped, applied = clip_to_tissue(heat, tissue)
    assert applied and np.isnan(clipped[:, 8:]).all() and (clipped[:, :8] == 1).all()
    tissue[:] = False
    tissue[0, 0] = True  # the mask missed the tissue: clipping would erase 99 % of the map
    same, applied = clip_to_tissue(heat, tissue)
    assert not applied and np.isfinite(same).all()


# --- scales --------------------------------------------------------------------------------------------
def test_rank_percentile() -> None:
    r = rank_percentile(np.array([0.1, 0.5, 0.2, 0.2]))
    np.testing.assert_allclose(r, [0, 100, 50, 50])
    assert rank_percentile(np.array([1.0])).tolist() == [100.0]


def test_attention_scales() -> None:
    att = np.array([0.8, 0.05, 0.05, 0.1, 0.0])
    default = HeatmapConfig()  # the default: each tile's P(class) on the fixed 0-1 scale; attention: fixed log2
    assert (default.score, default.attention_scale) == ("probability", "fixed")
    prob = tile_values(fake_scores(att), default)
    assert prob.scale == "probability" and (prob.vmin, prob.vmax) == (0, 1)
    rank = tile_values(fake_scores(att), HeatmapConfig(score="attention", attention_scale="rank"))
    assert rank.scale == "rank" and rank.values.argmax() == 0 and (rank.vmin, rank.vmax) == (0, 100)
    fixed = tile_values(fake_scores(att), HeatmapConfig(score="attention", attention_scale="fixed", attention_log2_max=1.5))
    # n·α = 4, 0.25, 0.25, 0.5, 0 -> log2 = 2, -2, -2, -1, -inf, clipped to [-1.5, 1.5]
    np.testing.assert_allclose(fixed.values, [1.5, -1.5, -1.5, -1.0, -1.5])
    assert "same on every slide" in fixed.label and "1×" in fixed.tick_labels
    uniform = tile_values(fake_scores(np.full(8, 1 / 8)), HeatmapConfig(score="attention"))
    np.testing.assert_allclose(uniform.values, 0.0, atol=1e-12)


def test_probability_class_defaults() -> None:
    probs = np.array([[0.2, 0.8], [0.9, 0.1]], np.float32)
    binary = fake_scores(np.array([0.5, 0.5]), probs, predicted="normal")
    v = tile_values(binary, HeatmapConfig(score="probability"))
    assert v.class_name == "tumor" and v.label.startswith("P(tumor)")  # the positive class, not the predicted one
    np.testing.assert_allclose(v.values, [0.8, 0.1])
    multi = fake_scores(np.array([1.0]), np.array([[0.2, 0.3, 0.5]], np.float32), ("a", "b", "c"), predicted="b")
    assert resolve_class(multi, None) == "b"
    with pytest.raises(BagFileError, match="not one of the model's classes"):
        tile_values(multi, HeatmapConfig(score="probability", class_name="tumour"))


def test_rank_tiles_orders_and_breaks_ties_by_attention() -> None:
    values = np.array([50.0, 100.0, 100.0, 0.0, 25.0])
    att = np.array([0.2, 0.3, 0.4, 0.0, 0.1])
    top, bottom = rank_tiles(values, att, 3)
    assert top.tolist() == [2, 1, 0] and bottom.tolist() == [3, 4, 0]
    assert rank_tiles(values, att, 10)[0].size == 5


# --- score files ---------------------------------------------------------------------------------------
def test_score_files_round_trip_and_errors(tmp_path: Path) -> None:
    coords = np.array([[0, 0], [512, 0]])
    kw = dict(slide_id="a", coords=coords, attention=[0.4, 0.6], instance_probabilities=[[0.3, 0.7], [0.6, 0.4]],
              class_names=["normal", "tumor"], bag_probabilities=[0.3, 0.7], tile_px=256, mpp=0.5,
              footprint_px=512.0, slide_mpp=0.25)
    s = load_scores(write_scores(tmp_path / "scores" / "a.h5", **kw))  # type: ignore[arg-type]
    assert s.n_tiles == 2 and s.predicted_class == "tumor" and s.predicted_probability == pytest.approx(0.7)
    assert s.class_names == ("normal", "tumor") and s.label == "" and s.footprint_px == 512.0
    assert find_scores(tmp_path) == {"a": tmp_path / "scores" / "a.h5"}
    bad = write_scores(tmp_path / "scores" / "b.h5", **{**kw, "slide_id": "b", "attention": [1.0]})  # type: ignore[arg-type]
    with pytest.raises(BagFileError, match=r"slide 'b'.*attention has shape \(1,\).*2 tile coordinates"):
        load_scores(bad)
    with h5py.File(tmp_path / "c.h5", "w") as fh:
        fh["coords"] = coords
    with pytest.raises(BagFileError, match="lacks attention"):
        load_scores(tmp_path / "c.h5")
    empty = write_scores(tmp_path / "e.h5", **{**kw, "coords": np.zeros((0, 2)), "attention": [],  # type: ignore[arg-type]
                                               "instance_probabilities": np.zeros((0, 2))})
    assert load_scores(empty).n_tiles == 0
    with pytest.raises(BagFileError, match="No scores folder"):
        find_scores(tmp_path / "nowhere")


def test_geojson_is_a_qupath_feature_collection() -> None:
    coords = np.array([[100, 200], [612, 200]])
    text = tile_detections_text(coords, 512.0, {"attention": np.array([0.25, 0.75]), "P(tumor)": np.array([0.1, 0.9])})
    gj = json.loads(text)
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == 2
    f = gj["features"][1]
    assert f["geometry"]["type"] == "Polygon"
    assert f["geometry"]["coordinates"][0] == [[612, 200], [1124, 200], [1124, 712], [612, 712], [612, 200]]
    assert f["properties"]["objectType"] == "detection"
    assert f["properties"]["measurements"] == {"attention": 0.75, "P(tumor)": 0.9}


def test_config_rejects_unknown_keys_and_yaml_matches_defaults(tmp_path: Path) -> None:
    from wsi_mil.config import load_config

    assert load_config(HeatmapConfig, REPO / "configs" / "heatmap.yaml") == HeatmapConfig()
    bad = tmp_path / "bad.yaml"
    bad.write_text("smoth_sigma_um: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'smoth_sigma_um'"):
        load_config(HeatmapConfig, bad)
    with pytest.raises(ConfigError, match="colormap"):
        load_config(HeatmapConfig, None, {"colormap": "rainbowz"})


# --- golden alignment ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("fmt", "mpp"), [("tif", 0.25), ("svs", 0.2631)])
def test_alignment_golden(tmp_path: Path, fmt: str, mpp: float) -> None:
    """The hottest heatmap cell lies on the distinctive tile in the thumbnail (within one thumbnail
    pixel), and the top-1 exported tile equals the region read at its coordinates."""
    case = make_case(tmp_path, f"golden_{fmt}", fmt=fmt, mpp=mpp)
    out = tmp_path / "out"
    cfg = HeatmapConfig(score="attention", attention_scale="rank", max_side_px=512)  # the per-slide rank scale
    result = run_heatmap([case.slide], tmp_path / "predict", out, cfg, progress=False)
    assert result.exit_code == 0, result.text()
    folder = out / case.slide.stem
    with h5py.File(folder / "heatmap.h5") as fh:
        heat = fh["heatmap"][()]
        ds = float(fh.attrs["downsample"])
        assert fh.attrs["score_scale"] == "rank" and fh["coords"].shape == case.coords.shape
    x, y = case.coords[case.mark_index]
    with open_slide(case.slide) as slide:
        thumb = slide.read_downsampled(ds)
        assert thumb.shape[:2] == heat.shape
        sx, sy = slide.dimensions[0] / heat.shape[1], slide.dimensions[1] / heat.shape[0]
        expected_tile = slide.read_region_mpp((int(x), int(y)), (case.tile_px, case.tile_px), case.tile_mpp)
    hot_rows, hot_cols = np.nonzero(heat == np.nanmax(heat))
    # the hot cells cover exactly the tile's footprint on the canvas, to within one pixel
    assert abs(hot_cols.min() - x / sx) <= 1 and abs(hot_cols.max() + 1 - (x + case.footprint) / sx) <= 1
    assert abs(hot_rows.min() - y / sy) <= 1 and abs(hot_rows.max() + 1 - (y + case.footprint) / sy) <= 1
    # ... and where the thumbnail itself shows the blue tile
    blue = (thumb[..., 2].astype(int) - thumb[..., 0] > 80) & (thumb[..., 1] < 100)
    b_rows, b_cols = np.nonzero(blue)
    assert abs(int(b_cols.min()) - int(hot_cols.min())) <= 1 and abs(int(b_cols.max()) - int(hot_cols.max())) <= 1
    assert abs(int(b_rows.min()) - int(hot_rows.min())) <= 1 and abs(int(b_rows.max()) - int(hot_rows.max())) <= 1
    # top-1 tile: the region at its coordinates, at the model's µm/px
    with open(folder / "top_tiles.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert (int(rows[0]["x"]), int(rows[0]["y"])) == (x, y) and rows[0]["rank"] == "1"
    assert len(rows) == 8 and float(rows[0]["score"]) == 100.0
    top1 = cv2.cvtColor(cv2.imread(str(folder / rows[0]["file"])), cv2.COLOR_BGR2RGB)
    assert top1.shape == (case.tile_px, case.tile_px, 3)
    np.testing.assert_array_equal(top1, expected_tile)
    assert np.abs(top1.reshape(-1, 3).mean(0) - MARK_RGB).max() < 12
    # the exports of the same slide agree with each other
    gj = json.loads((folder / "tiles.geojson").read_text())
    assert len(gj["features"]) == len(case.coords)
    best = max(gj["features"], key=lambda f: f["properties"]["measurements"]["attention"])
    assert best["geometry"]["coordinates"][0][0] == [int(x), int(y)]
    assert set(best["properties"]["measurements"]) >= {"attention", "attention rank percentile", "P(tumor)", "P(normal)"}


# --- batches -------------------------------------------------------------------------------------------
def test_batch_bad_slide_no_tiles_and_missing_scores(tmp_path: Path) -> None:
    good = make_case(tmp_path, "good", size=(1600, 1200), mark=(3, 2))
    empty = make_case(tmp_path, "empty", size=(1600, 1200), mark=None, n_tiles=0, label="normal", bag=(0.8, 0.2))
    broken = make_case(tmp_path, "broken", size=(1600, 1200), mark=(3, 2))
    broken.slide.write_bytes(b"this is not a slide")
    lonely = write_pyramid(tmp_path / "slides" / "lonely.tif", np.full((600, 800, 3), 240, np.uint8), mpp=0.5)
    out = tmp_path / "out"
    cfg = HeatmapConfig(max_side_px=400, top_k=3)
    result = run_heatmap([good.slide, empty.slide, broken.slide, lonely], tmp_path / "predict", out, cfg, progress=False)
    assert result.exit_code == 1 and result.missing_scores == ["lonely"]
    status = {r["slide_id"]: r for r in csv.DictReader(open(out / "manifest.csv", newline=""))}
    assert status["good"]["status"] == "done" and status["good"]["n_tiles"] == str(len(good.coords))
    assert status["empty"]["status"] == "done" and status["empty"]["note"] == "no tiles"  # R17
    assert status["broken"]["status"] == "failed" and status["broken"]["error_class"] == "SlideOpenError"
    assert status["lonely"]["status"] == "no_scores"
    assert (out / "empty" / "heatmap.png").stat().st_size > 10_000
    assert json.loads((out / "empty" / "summary.json").read_text())["note"] == "no tiles"
    assert json.loads((out / "empty" / "tiles.geojson").read_text())["features"] == []
    assert len(list((out / "good" / "top_tiles").glob("*.png"))) == 3
    page = (out / "index.html").read_text()
    assert page.index('id="good"') < page.index('id="empty"')  # sorted by P(tumor): 0.9 before 0.2
    assert "<td>broken</td><td>failed</td>" in page
    assert "lonely" in page and "no_scores" in page
    assert (out / "config.yaml").exists() and (out / "legend.png").exists()


def test_scores_that_do_not_fit_the_slide_fail_with_a_message(tmp_path: Path) -> None:
    case = make_case(tmp_path, "small", size=(1600, 1200), mark=(3, 2))
    s = load_scores(case.scores)
    write_scores(case.scores, slide_id="small", coords=s.coords + 5000, attention=s.attention,
                 instance_probabilities=s.instance_probabilities, class_names=list(s.class_names),
                 bag_probabilities=list(s.bag_probabilities), tile_px=s.tile_px, mpp=s.mpp,
                 footprint_px=s.footprint_px, slide_mpp=0.25)
    result = run_heatmap([case.slide], tmp_path / "predict", tmp_path / "out", HeatmapConfig(max_side_px=300),
                         progress=False)
    rec = result.summary.records[0]
    assert rec["status"] == "failed" and "do not fit the slide" in rec["error"]


def test_probability_score_and_fixed_scale(tmp_path: Path) -> None:
    case = make_case(tmp_path, "p", size=(1600, 1200), mark=(3, 2))
    for cfg in (HeatmapConfig(score="probability", max_side_px=300, top_k=2, smooth_sigma_um=40.0),
                HeatmapConfig(score="attention", attention_scale="fixed", max_side_px=300, top_k=2, write_geojson=False)):
        out = tmp_path / f"out_{cfg.score}_{cfg.attention_scale}"
        assert run_heatmap([case.slide], tmp_path / "predict", out, cfg, progress=False).exit_code == 0
        with h5py.File(out / "p" / "heatmap.h5") as fh:
            heat = fh["heatmap"][()]
            assert fh.attrs["score_kind"] == cfg.score
            assert np.nanmin(heat) >= float(fh.attrs["vmin"]) - 1e-6 and np.nanmax(heat) <= float(fh.attrs["vmax"]) + 1e-6
            assert np.isnan(heat).any() and np.isfinite(heat).any()  # clipped to tissue, scored inside
    assert not (out / "p" / "tiles.geojson").exists()


def test_no_matching_scores_is_an_input_error(tmp_path: Path) -> None:
    case = make_case(tmp_path, "x", size=(1600, 1200), mark=(3, 2))
    case.scores.rename(case.scores.with_name("y.h5"))
    with pytest.raises(InputError, match="matched by slide id"):
        run_heatmap([case.slide], tmp_path / "predict", tmp_path / "out", HeatmapConfig(), progress=False)


# --- command line --------------------------------------------------------------------------------------
def _cli():  # type: ignore[no-untyped-def]
    import click

    from wsi_mil.cli.heatmap import heatmap

    @click.group()
    def main() -> None:
        pass

    main.add_command(heatmap)
    return main


def test_cli_renders_reports_and_exits(tmp_path: Path) -> None:
    case = make_case(tmp_path, "case 01 é", size=(1600, 1200), mark=(3, 2))  # R22: spaces and unicode
    runner = CliRunner()
    out = tmp_path / "out dir"
    res = runner.invoke(_cli(), ["heatmap", str(tmp_path / "slides"), "--scores", str(tmp_path / "predict"),
                                 "--out", str(out), "--top-k", "2", "--max-side-px", "300", "--score", "probability"])
    assert res.exit_code == 0, res.output
    assert "1 done" in res.output and "review page" in res.output
    assert (out / "case 01 é" / "heatmap.png").exists() and (out / "index.html").exists()
    assert "score: probability" in (out / "config.yaml").read_text()
    res = runner.invoke(_cli(), ["heatmap", str(case.slide), "--out", str(out)])
    assert res.exit_code == 2 and "either --scores" in res.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("top: 3\n")
    res = runner.invoke(_cli(), ["heatmap", str(case.slide), "--scores", str(tmp_path / "predict"), "--out", str(out),
                                 "--config", str(bad)])
    assert res.exit_code == 2 and "unknown key 'top'" in res.output


def test_cli_features_and_checkpoint_runs_predict_then_renders(tmp_path: Path) -> None:
    """--features/--checkpoint: predict (the library function) into OUT/predict, then render; a slide
    whose bag is empty gets a "no tiles" figure (R17)."""
    pytest.importorskip("wsi_mil.runs.predict", reason="wsi_mil.runs.predict is not in this checkout yet")
    import torch
    from _train_data import ENCODER, WEIGHTS_SHA, bag_attrs, write_bag

    from wsi_mil import __version__
    from wsi_mil.mil import create_model
    from wsi_mil.store.bag_file import FeatureSpec
    from wsi_mil.store.checkpoint import save_checkpoint

    spec = FeatureSpec(ENCODER, 16, 0.5, 224, WEIGHTS_SHA, __version__)
    for fold in (0, 1):  # two untrained "fold" checkpoints: predict averages them
        torch.manual_seed(fold)
        save_checkpoint(tmp_path / "run" / f"fold{fold}", create_model("loss_attention", 16, 2, hidden_dims=[8]),
                        ["normal", "tumor"], spec)
    case = make_case(tmp_path / "new", "new1", size=(4000, 3000), tile_px=224, tile_mpp=0.5, offset=(20, 30), mark=(3, 2))
    empty = make_case(tmp_path / "new", "new2", size=(2000, 1500), tile_px=224, tile_mpp=0.5, mark=None)
    feats = tmp_path / "new" / "features"
    feats.mkdir()
    rng = np.random.default_rng(0)
    write_bag(feats / "new1.h5", rng.normal(size=(len(case.coords), 16)).astype(np.float32), case.coords,
              bag_attrs("new1", 16))
    write_bag(feats / "new2.h5", np.zeros((0, 16), np.float32), np.zeros((0, 2), np.int64), bag_attrs("new2", 16))
    out = tmp_path / "out"
    res = CliRunner().invoke(_cli(), ["heatmap", str(case.slide), str(empty.slide), "--features", str(feats),
                                      "--checkpoint", str(tmp_path / "run" / "fold0"),
                                      "--checkpoint", str(tmp_path / "run" / "fold1"), "--out", str(out), "--top-k", "2"])
    assert res.exit_code == 0, res.output
    scores = load_scores(out / "predict" / "scores" / "new1.h5")
    assert scores.n_tiles == len(case.coords) and scores.model and scores.n_checkpoints == 2
    assert (out / "new1" / "heatmap.png").exists()
    status = {r["slide_id"]: r for r in csv.DictReader(open(out / "manifest.csv", newline=""))}
    assert status["new1"]["status"] == "done" and status["new2"]["note"] == "no tiles"


def test_light_imports_and_no_torch(tmp_path: Path) -> None:
    """`--help` stays instant (no matplotlib/h5py on import) and rendering never loads torch."""
    import subprocess
    import sys

    case = make_case(tmp_path, "light", size=(1600, 1200), mark=(3, 2))
    code = f"""
import sys
import wsi_mil.cli.heatmap, wsi_mil.heatmap
heavy = [m for m in ("matplotlib", "h5py", "torch", "scipy") if m in sys.modules]
assert not heavy, heavy
from pathlib import Path
from wsi_mil.config.heatmap import HeatmapConfig
from wsi_mil.runs.heatmap import run_heatmap
r = run_heatmap([Path({str(case.slide)!r})], {str(tmp_path / "predict")!r}, {str(tmp_path / "out")!r},
                HeatmapConfig(max_side_px=300, top_k=1), progress=False)
assert r.exit_code == 0, r.text()
assert "torch" not in sys.modules
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_scores_are_never_drawn_over_another_slide_with_the_same_id(tmp_path: Path, caplog) -> None:
    """Two cohorts whose slide ids match: scores made from one slide are refused over the other, naming
    both files; the right slide is drawn and its heatmap.h5 records the fingerprint it was drawn on."""
    right = make_case(tmp_path / "a", "s1", size=(1600, 1200), mark=(3, 2), seed=0)
    other = make_case(tmp_path / "b", "s1", size=(1600, 1200), mark=(3, 2), seed=1)  # same id, other pixels
    with open_slide(right.slide) as slide:
        fingerprint = slide.fingerprint()
    with open_slide(other.slide) as slide:
        assert fingerprint.differences(slide.fingerprint())
    with h5py.File(right.scores, "a") as fh:
        fh.attrs["slide_fingerprint"] = fingerprint.to_json()  # as `wsi-mil predict` copies it from the bag
    cfg = HeatmapConfig(max_side_px=300, top_k=1)
    result = run_heatmap([other.slide], tmp_path / "a" / "predict", tmp_path / "wrong", cfg, progress=False)
    row = next(csv.DictReader(open(tmp_path / "wrong" / "manifest.csv", newline="")))
    assert result.exit_code == 1 and row["status"] == "failed" and row["error_class"] == "SlideIdentityError"
    assert str(right.scores) in row["error"] and str(other.slide) in row["error"] and "--ignore-slide-identity" in row["error"]
    assert not (tmp_path / "wrong" / "s1" / "heatmap.png").exists()
    ok = run_heatmap([right.slide], tmp_path / "a" / "predict", tmp_path / "right", cfg, progress=False)
    assert ok.exit_code == 0
    with h5py.File(tmp_path / "right" / "s1" / "heatmap.h5") as fh:
        assert fh.attrs["slide_fingerprint"] == fingerprint.to_json()
    with caplog.at_level("WARNING"):
        forced = run_heatmap([other.slide], tmp_path / "a" / "predict", tmp_path / "forced",
                             HeatmapConfig(max_side_px=300, top_k=1, ignore_slide_identity=True), progress=False)
    assert forced.exit_code == 0 and "drawn anyway" in caplog.text
