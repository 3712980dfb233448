"""``wsi-mil view`` without a browser: what a run lists, deep-zoom tiles, overlay cells, the handle cache, and
what a live server on 127.0.0.1 answers to good, malformed and hostile requests (raw HTTP, so that ``..``
and encoded paths reach the server as sent)."""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from viewer_fixtures import (
    BROKEN_ERROR,
    NOT_VIEWABLE,
    SECRET,
    VIEWABLE,
    ViewerRun,
    copy_heatmaps_alone,
    module_fixtures,
)

from wsi_mil.cli.main import main
from wsi_mil.config import load_config
from wsi_mil.config.view import ViewConfig
from wsi_mil.errors import InputError, NotServedError
from wsi_mil.slide import open_slide
from wsi_mil.slide.deepzoom import DeepZoomGrid, TileRequestError, read_tile
from wsi_mil.viewer import Catalog, ViewerServer, ViewerService, is_loopback
from wsi_mil.viewer.cache import SlideCache
from wsi_mil.viewer.evidence import Evidence

ROOT = Path(__file__).resolve().parents[1]


run, server = module_fixtures("viewer")


def get(server: ViewerServer, path: str) -> tuple[int, str, bytes]:
    """One raw GET: the path goes out exactly as written (no normalisation of ``..`` or ``%2e``)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=20)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type", ""), resp.read()
    finally:
        conn.close()


# --- what a run lists ------------------------------------------------------------------------------------
def test_the_catalog_lists_every_slide_and_why_some_cannot_be_shown(run: ViewerRun) -> None:
    catalog = Catalog.open(run.root)
    catalog.verify_all()
    status = {sid: (e.status, e.reason) for sid, e in catalog.entries.items()}
    assert sorted(catalog.viewable_ids()) == sorted(VIEWABLE)
    assert {sid: s for sid, (s, _) in status.items() if sid not in VIEWABLE} == NOT_VIEWABLE
    assert status["broken"][1] == BROKEN_ERROR
    assert "missing" in status["gone"][1]
    assert "another slide file" in status["swapped"][1] and "swapped.tif" in status["swapped"][1]
    b = catalog.entries["normal_b"]
    assert (b.label, b.predicted_class, b.scored_by, b.correct) == ("normal", "tumor", "in_sample:ensemble:5", False)
    a = catalog.entries["tumor_a"]
    assert a.annotation_path is not None and a.tissue_path is not None and a.dimensions == (3000, 2200)
    assert catalog.review_dir == run.root / "heatmaps"


def test_a_heatmap_folder_alone_is_viewable_from_its_own_arrays(run: ViewerRun, tmp_path: Path) -> None:
    alone = copy_heatmaps_alone(run, tmp_path)
    catalog = Catalog.open(alone)
    catalog.verify_all()
    assert catalog.kind == "heatmap" and sorted(catalog.viewable_ids()) == sorted(VIEWABLE)
    assert catalog.entries["swapped"].status == "failed" and "another slide file" in catalog.entries["swapped"].reason
    service = ViewerService(catalog)
    try:
        case = run.cases["tumor_a"]
        assert case.mark_index is not None
        x, y = case.coords[case.mark_index] + case.footprint / 2
        hit = service.tile_at("tumor_a", str(x), str(y), None)
        assert hit is not None and hit["index"] == case.mark_index and hit["attention_rank"] == 1
        tissue = service.polygons("tumor_a", "tissue")["polygons"]  # outlines of heatmap.h5's tissue mask
        assert tissue and min(len(p["rings"][0]) for p in tissue) >= 3
    finally:
        service.close()


def test_the_run_folder_must_hold_a_run(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="holds no wsi-mil run"):
        Catalog.open(tmp_path)
    result = CliRunner().invoke(main, ["view", str(tmp_path), "--port", "0"])
    assert result.exit_code == 2 and "holds no wsi-mil run" in result.output


# --- tiles ------------------------------------------------------------------------------------------------
def test_deep_zoom_tiles_are_slide_reads_on_the_dzi_grid(run: ViewerRun) -> None:
    grid = DeepZoomGrid(3000, 2200)
    assert grid.max_level == 12 and grid.level_dimensions(12) == (3000, 2200) and grid.level_dimensions(0) == (1, 1)
    assert grid.tile_count(12) == (12, 9) and grid.level_dimensions(10) == (750, 550)
    assert 'TileSize="254"' in grid.dzi_xml() and 'Width="3000"' in grid.dzi_xml()
    box = grid.tile_box(12, 3, 2)
    assert (box.x, box.y, box.width, box.height) == (3 * 254 - 1, 2 * 254 - 1, 256, 256)
    edge = grid.tile_box(12, 11, 8)
    assert (edge.x + edge.width, edge.y + edge.height) == (3000, 2200)
    with open_slide(run.cases["tumor_a"].slide) as slide:
        full = read_tile(slide, grid, 12, 3, 2)
        np.testing.assert_array_equal(full, slide.read_region((box.x, box.y), 0, (256, 256)))
        coarse = read_tile(slide, grid, 10, 1, 1)  # downsample 4: the slide's own level 1
        b = grid.tile_box(10, 1, 1)
        np.testing.assert_array_equal(coarse, slide.read_region((b.x * 4, b.y * 4), 1, (b.width, b.height)))
        half = read_tile(slide, grid, 11, 1, 1)  # downsample 2: level 0 halved
        b = grid.tile_box(11, 1, 1)
        ref = cv2.resize(slide.read_region((b.x * 2, b.y * 2), 0, (b.width * 2, b.height * 2)), (b.width, b.height),
                         interpolation=cv2.INTER_AREA)
        np.testing.assert_array_equal(half, ref)
    for bad in [(13, 0, 0), (12, 12, 0), (12, 0, 9), ("x", 0, 0), ("-1", 0, 0), ("1.5", 0, 0), (True, 0, 0)]:
        with pytest.raises(TileRequestError):
            grid.check(*bad)


def test_overlay_cells_lie_on_the_tiles_in_the_colour_of_their_score(run: ViewerRun) -> None:
    catalog = Catalog.open(run.root)
    entry = catalog.verify("tumor_a")
    case = run.cases["tumor_a"]
    assert case.mark_index is not None
    ev = Evidence(catalog.load_scores(entry))
    grid = DeepZoomGrid(3000, 2200)
    layer = ev.layer("probability")
    assert (layer.vmin, layer.vmax, layer.class_name) == (0.0, 1.0, "tumor")
    x, y = (int(v) for v in case.coords[case.mark_index])
    f = case.footprint
    level = 12
    col, row = int(x // 254), int(y // 254)
    box = grid.tile_box(level, col, row)
    rgba = ev.paint(layer, box)
    # every pixel whose centre lies in the marked tile has the colour of its P(tumor); none outside any tile
    colour = ev.colour_of(layer, float(layer.values[case.mark_index]))
    js = np.arange(box.width) + box.x + 0.5
    is_ = np.arange(box.height) + box.y + 0.5
    inside = ((js >= x) & (js < x + f))[None, :] & ((is_ >= y) & (is_ < y + f))[:, None]
    assert inside.sum() > 100
    assert (rgba[inside][:, :3] == colour).all() and (rgba[inside][:, 3] == 255).all()
    covered = np.zeros((box.height, box.width), bool)
    for tx, ty in case.coords:
        covered |= ((js >= tx) & (js < tx + f))[None, :] & ((is_ >= ty) & (is_ < ty + f))[:, None]
    assert (rgba[~covered][:, 3] == 0).all() and (rgba[covered][:, 3] == 255).all()
    # the colour table is matplotlib's: 0 -> first entry, 1 -> last
    assert ev.colour_of(layer, 0.0) == tuple(ev.lut[0]) and ev.colour_of(layer, 1.0) == tuple(ev.lut[255])
    smooth = ev.paint(layer, box, smoothed=True)
    assert (smooth[..., 3] > 0).sum() > 0.5 * covered.sum()
    # attention: n·α on the fixed log2 scale; the marked tile (highest attention) is at the top (+4, 16x)
    att = ev.layer("attention")
    assert (att.vmin, att.vmax) == (-4.0, 4.0) and float(att.values[case.mark_index]) == 4.0
    assert ev.readout(case.mark_index)["attention_rank"] == 1


def test_the_handle_cache_is_bounded_and_never_shares_a_handle() -> None:
    opened: list[str] = []
    in_use: set[int] = set()
    lock = threading.Lock()
    overlap: list[int] = []

    class FakeSlide:
        def __init__(self, key: str) -> None:
            self.key, self.closed = key, False

        def close(self) -> None:
            self.closed = True

    def opener(key: str) -> FakeSlide:
        opened.append(key)
        return FakeSlide(key)

    cache = SlideCache(opener, max_slides=2, handles_per_slide=2)  # type: ignore[arg-type]
    peak = [0]

    def work(n: int) -> None:
        for i in range(60):
            key = f"s{(n + i) % 4}"
            with cache.borrow(key) as slide:
                assert isinstance(slide, FakeSlide) and not slide.closed and slide.key == key
                with lock:
                    if id(slide) in in_use:
                        overlap.append(id(slide))
                    in_use.add(id(slide))
                    peak[0] = max(peak[0], cache.open_handles)
                time.sleep(0.0005)
                with lock:
                    in_use.discard(id(slide))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not overlap, "a handle was used by two threads at once"
    assert peak[0] <= 2 * 2
    assert cache.open_handles <= 4
    cache.close()
    assert cache.open_handles == 0


# --- the server ------------------------------------------------------------------------------------------
def test_it_binds_127_0_0_1_by_default_and_warns_for_any_other_host(caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_config(ViewConfig, ROOT / "configs" / "view.yaml")
    assert cfg == ViewConfig() and cfg.host == "127.0.0.1"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.20") and not is_loopback("example.org")
    from wsi_mil.viewer.server import warn_if_exposed

    with caplog.at_level(logging.WARNING, logger="wsi_mil.viewer.server"):
        warn_if_exposed("127.0.0.1", 8765)
        assert not caplog.records
        warn_if_exposed("0.0.0.0", 8765)
    assert len(caplog.records) == 1 and "0.0.0.0" in caplog.records[0].getMessage()


def test_pages_json_and_tiles_are_served(server: ViewerServer, run: ViewerRun) -> None:
    status, ctype, body = get(server, "/api/slides")
    assert status == 200 and ctype == "application/json"
    listed = {s["slide_id"]: s for s in json.loads(body)["slides"]}
    assert set(listed) == set(VIEWABLE) | set(NOT_VIEWABLE)
    assert {sid: s["status"] for sid, s in listed.items() if s["status"] != "ok"} == NOT_VIEWABLE
    assert listed["normal_b"]["in_sample"] and listed["normal_b"]["correct"] is False
    assert all(str(run.root) not in s["reason"] for s in listed.values())  # file names, not paths
    sid = quote("case c é")
    status, _, body = get(server, f"/api/slide/{sid}")
    info = json.loads(body)
    assert status == 200 and info["viewable"] and info["width"] == 1600 and info["default_layer"] == "probability"
    status, ctype, body = get(server, f"/tiles/{sid}/{info['max_level']}/0_0.jpeg")
    assert status == 200 and ctype == "image/jpeg" and body[:2] == b"\xff\xd8"
    tile = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
    assert tile.shape == (255, 255, 3)  # 254 + one pixel of overlap on the inner sides
    for fmt, magic in (("png", b"\x89PNG"), ("jpeg", b"\xff\xd8")):
        status, ctype, body = get(server, f"/overlay/{sid}/attention/{info['max_level']}/1_1.{fmt}?smooth=1")
        assert status == 200 and ctype == f"image/{fmt}" and body.startswith(magic)
    status, _, body = get(server, f"/api/slide/{sid}/layer/rank?k=3")
    layer = json.loads(body)
    assert status == 200 and len(layer["top"]) == 3 and layer["top"][0]["values"]["rank"] == 100.0
    assert not layer["fixed"] and json.loads(get(server, f"/api/slide/{sid}/layer/probability")[2])["fixed"]
    status, ctype, body = get(server, f"/crop/{sid}/{layer['top'][0]['index']}.jpeg")
    assert status == 200 and cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR).shape[0] == 64
    assert get(server, "/api/slide/tumor_a/annotations.json")[0] == 200
    assert get(server, "/api/slide/tumor_a/tissue.json")[0] == 200
    for page in ("/", f"/slide/{sid}", "/review/index.html", "/static/slide.js",
                 "/vendor/openseadragon/openseadragon.min.js"):
        assert get(server, page)[0] == 200, page
    status, _, body = get(server, "/api/ping")
    assert status == 200 and sorted(json.loads(body)["slides"]) == sorted(VIEWABLE)


def test_a_missing_or_swapped_slide_is_listed_with_its_reason_and_the_others_serve(server: ViewerServer) -> None:
    for sid, why in (("gone", "missing"), ("swapped", "another slide file")):
        status, _, body = get(server, f"/api/slide/{sid}")
        info = json.loads(body)
        assert status == 200 and not info["viewable"] and why in info["reason"]
        assert get(server, f"/tiles/{sid}/0/0_0.jpeg")[0] == 404
        assert get(server, f"/overlay/{sid}/probability/0/0_0.png")[0] == 404
        assert get(server, f"/slide/{sid}")[0] == 200  # the page says why
    assert get(server, "/tiles/tumor_a/12/0_0.jpeg")[0] == 200


HOSTILE = [
    "/tiles/../../../../etc/passwd", "/tiles/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/%2e%2e/%2e%2e/etc/passwd",
    "/review/../secret.txt", "/review/%2e%2e/secret.txt", "/review/%2E%2E%2Fsecret.txt", "/review/..%2fsecret.txt",
    "/review/%2e%2e/predict/predict.json", "/review//etc/passwd", "/review/%2Fetc%2Fpasswd",
    "/review/secret_link.txt", "/review/link_out/secret.txt", "/review/.records/tumor_a.json",
    "/static/../../../../etc/passwd", "/static/%2e%2e/app.py", "/static/%2e%2e%2f%2e%2e%2fsecret.txt",
    "/vendor/openseadragon/%2e%2e/%2e%2e/%2e%2e/package.json", "//etc/passwd", "/etc/passwd", "/secret.txt",
    "/slide/..", "/slide/%2e%2e", "/slide/nope", "/api/slide/nope", "/api/slide/..%2f..%2fsecret",
    "/tiles/nope/0/0_0.jpeg", "/tiles/..%2fgone/0/0_0.jpeg", "/crop/nope/0.jpeg",
    "/overlay/tumor_a/nolayer/0/0_0.png", "/overlay/tumor_a/..%2f..%2fsecret/0/0_0.png",
    "/api/slide/tumor_a/%2e%2e.json", "/api/slide/tumor_a/secret.json", "/tiles/tumor_a/12/0_0.png",
]


@pytest.mark.parametrize("path", HOSTILE)
def test_anything_outside_the_run_is_a_404_without_content(server: ViewerServer, path: str) -> None:
    status, ctype, body = get(server, path)
    assert status == 404, (path, status, body[:200])
    text = body.decode("utf-8", "replace")
    assert SECRET not in text and "root:" not in text and "Traceback" not in text and len(body) < 100
    assert ctype.startswith("text/plain")


MALFORMED = [
    "/tiles/tumor_a/x/0_0.jpeg", "/tiles/tumor_a/-1/0_0.jpeg", "/tiles/tumor_a/99/0_0.jpeg", "/tiles/tumor_a/1.5/0_0.jpeg",
    "/tiles/tumor_a/12/a_0.jpeg", "/tiles/tumor_a/12/0_-1.jpeg", "/tiles/tumor_a/12/12_0.jpeg", "/tiles/tumor_a/12/0_9.jpeg",
    "/tiles/tumor_a/12/9999999999_0.jpeg", "/tiles/tumor_a/12/0_0.jpg", "/tiles/tumor_a/12/..", "/tiles/tumor_a/%2e%2e/0_0.jpeg",
    "/tiles/tumor_a/12/%2e%2e.jpeg", "/overlay/tumor_a/probability/13/0_0.png", "/overlay/tumor_a/probability/12/0_0.png?smooth=2",
    "/overlay/tumor_a/probability/12/0_0.png?class=cat", "/crop/tumor_a/abc.jpeg", "/crop/tumor_a/99999.jpeg",
    "/api/slide/tumor_a/tile_at?x=abc&y=1", "/api/slide/tumor_a/tile_at?x=nan&y=1", "/api/slide/tumor_a/tile_at",
    "/api/slide/tumor_a/layer/rank?k=abc", "/api/slide/tumor_a/layer/probability?class=cat",
]


@pytest.mark.parametrize("path", MALFORMED)
def test_a_malformed_level_column_row_or_index_is_a_400(server: ViewerServer, path: str) -> None:
    status, ctype, body = get(server, path)
    assert status == 400, (path, status, body[:200])
    text = body.decode()
    assert ctype.startswith("text/plain") and text.startswith("bad request") and "Traceback" not in text
    assert "\n" not in text.strip() and len(text) < 300


def test_the_command_prints_its_url_serves_and_stops_on_ctrl_c(run: ViewerRun, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "wsi_mil", "view", str(run.root), "--port", "0"],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(2)]
        match = re.search(r"open (http://127\.0\.0\.1:(\d+)/) in a browser", "".join(lines))
        assert match, (lines, log.read_text())
        conn = http.client.HTTPConnection("127.0.0.1", int(match.group(2)), timeout=20)
        conn.request("GET", "/api/ping")
        assert json.loads(conn.getresponse().read())["app"] == "wsi-mil view"
        conn.close()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) in (0, 130)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_memory_and_handles_stay_bounded_while_panning(run: ViewerRun) -> None:
    """Every tile of the largest slide at full resolution, twice, through the service: handles and the tile
    cache stay within their bounds (the 100,000 x 80,000 px case is measured in benchmarks/viewer.py)."""
    service = ViewerService(Catalog.open(run.root), ViewConfig(tile_cache_mb=1, handles_per_slide=2))
    try:
        service.entry("tumor_a")
        grid = service.grid(service.catalog.entries["tumor_a"])
        cols, rows = grid.tile_count(grid.max_level)
        for _ in range(2):
            for r in range(rows):
                for c in range(cols):
                    assert service.slide_tile("tumor_a", grid.max_level, c, r)[:2] == b"\xff\xd8"
        assert service.slides.open_handles <= 2 and service.tiles._size <= 1024 * 1024
        assert service.slides.opened == 1  # one client at a time: one handle, opened once and reused
    finally:
        service.close()


def test_the_set_up_installs_openseadragon_from_npm_and_the_image_carries_it() -> None:
    """OpenSeadragon comes from the npm registry at the locked version, in `make setup` and in the Docker build."""
    package = json.loads((ROOT / "package.json").read_text())
    lock = json.loads((ROOT / "package-lock.json").read_text())
    version = package["dependencies"]["openseadragon"]
    assert lock["packages"]["node_modules/openseadragon"]["version"] == version
    assert lock["packages"]["node_modules/openseadragon"]["integrity"].startswith("sha512-")  # npm ci checks it
    makefile = (ROOT / "Makefile").read_text()
    assert "npm ci" in makefile and re.search(r"^setup: .*\$\(NODE_STAMP\)", makefile, re.M)
    assert re.search(r"^test: .*\$\(NODE_STAMP\)", makefile, re.M)
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "npm ci" in dockerfile and "WSI_MIL_OPENSEADRAGON=/opt/wsi-mil/openseadragon" in dockerfile
    assert "COPY --from=viewer-assets /assets/node_modules/openseadragon/build/openseadragon /opt/wsi-mil/openseadragon" in dockerfile


@pytest.mark.slow
def test_the_viewer_benchmark_runs(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "viewer.py"), "--quick", "--cache", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env, check=False)
    assert "targets:" in proc.stdout and "errors at 32 clients 0 (0)" in proc.stdout, proc.stdout + proc.stderr[-2000:]


def test_a_slide_file_deleted_while_serving_becomes_missing_and_the_others_serve(run: ViewerRun, tmp_path: Path) -> None:
    moved = tmp_path / "tumor_a.tif"
    shutil.copyfile(run.cases["tumor_a"].slide, moved)
    other = run.cases["case c é"].slide
    service = ViewerService(Catalog.open(run.root, slides=[moved, other]))
    try:
        assert service.catalog.entries["normal_b"].status == "missing"  # not among --slides
        assert service.slide_tile("tumor_a", 12, 0, 0)[:2] == b"\xff\xd8"
        moved.unlink()
        service.slides.forget("tumor_a")  # the handle is gone (evicted); the next read must open the file again
        with pytest.raises(NotServedError):
            service.slide_tile("tumor_a", 12, 1, 0)
        assert service.catalog.entries["tumor_a"].status == "missing"
        assert service.slide_tile("case c é", 11, 0, 0)[:2] == b"\xff\xd8"
    finally:
        service.close()


def test_openslide_handles_can_share_one_decoded_tile_cache(run: ViewerRun) -> None:
    path = run.cases["normal_b"].slide
    with open_slide(path, backend="openslide") as own, open_slide(path, backend="openslide") as shared:
        shared.share_tile_cache(8 * 1024 * 1024)
        other = open_slide(path, backend="openslide")
        other.share_tile_cache(8 * 1024 * 1024)
        assert shared._shared_cache is other._shared_cache is not None  # one cache per capacity, process-wide
        expected = own.read_region((300, 200), 0, (400, 300))
        np.testing.assert_array_equal(shared.read_region((300, 200), 0, (400, 300)), expected)
        shared.reopen()  # a fresh handle keeps the shared cache
        np.testing.assert_array_equal(shared.read_region((300, 200), 0, (400, 300)), expected)
        other.close()
    with open_slide(run.cases["tumor_a"].slide, backend="tiffslide") as plain:
        plain.share_tile_cache(8 * 1024 * 1024)  # nothing to share: ignored
        assert plain.read_region((0, 0), 0, (8, 8)).shape == (8, 8, 3)
