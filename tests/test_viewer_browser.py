"""``wsi-mil view`` in a real browser: Debian's headless Chromium driven over the DevTools protocol (``cdp.py``),
against a viewer on 127.0.0.1. What a user sees is read from screenshots; where the view is, from the viewer.
Screenshots are left in the test's temporary folder (``shots/``) for a person to look at."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import cv2
import numpy as np
import pytest
from cdp import CHROMIUM, Browser
from viewer_fixtures import NOT_VIEWABLE, VIEWABLE, ViewerRun, module_fixtures

from wsi_mil.viewer import ViewerServer

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install chromium; "
                                                ".ci/run installs it)"),
]

MARK_RGB = (25, 35, 170)


run, server = module_fixtures("viewer_browser")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with Browser(1400, 900) as b:
        yield b


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shots")


def open_slide_page(browser: Browser, server: ViewerServer, slide_id: str, state: str = "") -> dict:
    browser.goto("about:blank")
    browser.goto(f"{server.url}slide/{quote(slide_id)}{state}")
    assert browser.wait_for("document.body.dataset.ready", 30) == "1"
    browser.wait_for("!!(wsiView.overlayItem && wsiView.layerInfo)", 30)
    settle(browser)
    return json.loads(browser.eval("JSON.stringify(wsiView.info)"))


def settle(browser: Browser) -> None:
    """Wait until the view stops moving and every tile in it is drawn."""
    browser.wait_for(
        "(function(){var v=wsiView.viewer.viewport; return v.getCenter(true).distanceTo(v.getCenter(false)) < 1e-9 &&"
        " Math.abs(v.getZoom(true) - v.getZoom(false)) < 1e-9 && wsiView.slideItem.getFullyLoaded() &&"
        " (wsiView.overlayItem.getOpacity() === 0 || wsiView.overlayItem.getFullyLoaded());})()", 30)
    browser.eval("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


def screen_rgb(browser: Browser, path: Path) -> np.ndarray:
    png = browser.screenshot(path)
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def on_screen(browser: Browser, x: float, y: float) -> tuple[float, float]:
    """Page (CSS = screenshot) pixel of level-0 point (x, y) in the current view."""
    p = browser.eval(
        f"(function(){{var r=document.getElementById('osd').getBoundingClientRect();"
        f"var p=wsiView.slideItem.imageToViewerElementCoordinates(new OpenSeadragon.Point({x},{y}));"
        f"return [r.left + p.x, r.top + p.y];}})()"
    )
    return float(p[0]), float(p[1])


def view(browser: Browser) -> tuple[float, float, float]:
    v = browser.eval(
        "(function(){var vp=wsiView.viewer.viewport, it=wsiView.slideItem; var c=it.viewportToImageCoordinates("
        "vp.getCenter(true)); return [c.x, c.y, it.viewportToImageZoom(vp.getZoom(true))];})()"
    )
    return float(v[0]), float(v[1]), float(v[2])


def centre_of(browser: Browser, selector: str) -> tuple[float, float]:
    r = browser.eval(f"(function(){{var r=document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
                     "return [r.left + r.width / 2, r.top + r.height / 2];})()")
    return float(r[0]), float(r[1])


def test_the_cohort_page_lists_the_slides_sorts_misclassified_first_and_gives_reasons(
    browser: Browser, server: ViewerServer, shots: Path
) -> None:
    browser.goto(server.url)
    assert browser.wait_for("document.body.dataset.ready", 20) == "1"
    rows = browser.eval("Array.from(document.querySelectorAll('tr.slide')).map(r => r.dataset.id)")
    assert sorted(rows) == sorted(VIEWABLE)
    other = browser.eval("Array.from(document.querySelectorAll('#not-viewable tr[data-id]')).map(r => "
                         "[r.dataset.id, r.dataset.status, r.cells[3].textContent])")
    assert {sid: status for sid, status, _ in other} == NOT_VIEWABLE
    assert all(reason for _, _, reason in other)
    # the in-sample slide's "scored by" is red
    colour = browser.eval("getComputedStyle(document.querySelector('tr[data-id=\"normal_b\"] td.insample')).color")
    assert colour == "rgb(176, 0, 0)"
    browser.click(*centre_of(browser, "#wrong-first"))
    first = browser.wait_for("document.querySelector('tr.slide').dataset.id === 'normal_b' && 'normal_b'")
    assert first == "normal_b" and "sort=wrongfirst" in browser.eval("location.hash")
    # thumbnails have a fixed box: one that loads late does not move the header a click aims at
    aim = centre_of(browser, "th[data-key='slide']")
    browser.wait_for("Array.from(document.querySelectorAll('td.thumb img')).every(i => i.complete) && "
                     "getComputedStyle(document.querySelector('td.thumb img')).width === '90px'")
    assert centre_of(browser, "th[data-key='slide']") == aim
    browser.click(*aim)  # a column header sorts by it
    browser.wait_for("document.querySelector('tr.slide').dataset.id === 'tumor_a'")
    browser.screenshot(shots / "cohort.png")


def test_the_slide_page_draws_the_slide_and_the_overlay_toggles(
    browser: Browser, server: ViewerServer, run: ViewerRun, shots: Path
) -> None:
    open_slide_page(browser, server, "tumor_a", "#overlay=0")
    img = screen_rgb(browser, shots / "slide_without_overlay.png")
    r = browser.eval("(function(){var r=document.getElementById('osd').getBoundingClientRect();"
                     "return [r.left, r.top, r.width, r.height];})()")
    x0, y0, w, h = (int(v) for v in r)
    stage = img[y0 : y0 + h, x0 : x0 + w].astype(int)
    pink = (stage[..., 0] > 170) & (stage[..., 1] > 90) & (stage[..., 1] < 175) & (stage[..., 2] > 140) & (
        stage[..., 0] - stage[..., 1] > 40)
    assert pink.mean() > 0.2, f"only {pink.mean():.1%} of the viewer is tissue-coloured"
    case = run.cases["tumor_a"]
    assert case.mark_index is not None
    mx, my = (float(v) + case.footprint / 2 for v in case.coords[case.mark_index])
    sx, sy = on_screen(browser, mx, my)
    assert np.abs(img[int(sy), int(sx)].astype(int) - MARK_RGB).max() < 30  # the marked tile, no colour on it
    browser.move(sx, sy)  # the read-out of the tile under the pointer
    text = browser.wait_for("document.getElementById('readout').textContent")
    n = len(case.coords)
    assert f"tile {case.mark_index} at (" in text and f"rank 1 of {n}" in text and "P(tumor)" in text
    browser.key("o")  # overlay on
    assert browser.wait_for("wsiView.overlayItem.getOpacity() === 0.5 && document.getElementById('overlay').checked")
    settle(browser)
    with_overlay = screen_rgb(browser, shots / "slide_with_overlay.png")
    lut = browser.eval("wsiView.info.lut")
    p = float(browser.eval(f"wsiView.layerInfo.top.find(t => t.index === {case.mark_index}).values.probability"))
    colour = np.array([int(lut[min(int(p * 256), 255)][i : i + 2], 16) for i in (1, 3, 5)])
    expected = 0.5 * np.array(MARK_RGB) + 0.5 * colour
    assert np.abs(with_overlay[int(sy), int(sx)].astype(float) - expected).max() < 6
    browser.key("o")  # and off again
    assert browser.wait_for("wsiView.overlayItem.getOpacity() === 0 && !document.getElementById('overlay').checked")
    settle(browser)
    again = screen_rgb(browser, shots / "slide_overlay_off_again.png")
    assert np.abs(again[int(sy), int(sx)].astype(int) - MARK_RGB).max() < 30
    # the ground-truth lesion (key g): a dashed black outline one tile around the marked tile
    browser.key("g")
    browser.wait_for("document.querySelector('#shapes path.annotation') !== null")
    settle(browser)
    drawn = screen_rgb(browser, shots / "slide_with_annotation.png")
    x0, y0 = (float(v) for v in case.coords[case.mark_index])
    f = case.footprint
    left = [on_screen(browser, x0 - f, y0 - f + k * 3 * f / 40) for k in range(1, 40)]
    dark = [int(drawn[int(round(py)), int(round(px))].max() < 80) for px, py in left]
    assert 0.3 < np.mean(dark) < 0.95, dark  # dashes and gaps along the lesion's left edge
    inside = on_screen(browser, x0 - f / 2, y0 - f / 2)  # between outline and tile: no line there
    assert drawn[int(inside[1]), int(inside[0])].max() > 120


def test_the_overlay_under_each_top_5_tile_has_its_score_colour_on_the_colour_bar(
    browser: Browser, server: ViewerServer, run: ViewerRun, shots: Path
) -> None:
    open_slide_page(browser, server, "tumor_a", "#x=1500&y=1100&z=0.3&opacity=1&overlay=1&layer=probability")
    top = json.loads(browser.eval("JSON.stringify(wsiView.layerInfo.top.slice(0, 5))"))
    assert len(top) == 5 and top[0]["index"] == run.cases["tumor_a"].mark_index
    img = screen_rgb(browser, shots / "top5_colours.png")
    f = run.cases["tumor_a"].footprint
    colours = []
    for t in top:
        value = t["values"]["probability"]
        k = min(int(value * 256), 255)  # the colour bar's entry for this score (0 at the left, 1 at the right)
        bar = browser.eval(f"Array.from(document.getElementById('colorbar').getContext('2d').getImageData({k}, 0, 1, 1)"
                           ".data.slice(0, 3))")
        sx, sy = on_screen(browser, t["x"] + f / 2, t["y"] + f / 2)
        pixel = img[int(sy), int(sx)].astype(int)
        assert np.abs(pixel - np.array(bar)).max() <= 3, (t["index"], value, pixel, bar)
        colours.append(tuple(bar))
    assert len(set(colours)) >= 3  # the five scores are told apart by colour
    legend = browser.eval("document.getElementById('legend').textContent")
    assert "Fixed scale, the same on every slide" in legend and "P(tumor)" in legend


def test_clicking_a_top_tile_flies_to_it_and_the_address_restores_the_view(
    browser: Browser, server: ViewerServer, run: ViewerRun, shots: Path
) -> None:
    open_slide_page(browser, server, "tumor_a", "#layer=attention&opacity=0.8&tissue=1&ann=1")
    assert browser.eval("document.getElementById('layer').value") == "attention"
    tile = json.loads(browser.eval("JSON.stringify(wsiView.layerInfo.top[2])"))
    browser.click(*centre_of(browser, "#top figure:nth-child(3)"))
    browser.wait_for(f"wsiView.target && wsiView.target.index === {tile['index']}")
    settle(browser)
    f = run.cases["tumor_a"].footprint
    x, y, z = view(browser)
    assert abs(x - (tile["x"] + f / 2)) < 2 and abs(y - (tile["y"] + f / 2)) < 2
    assert f * z > 150  # zoomed in: the tile is large on screen
    img = screen_rgb(browser, shots / "flown_to_top_tile.png")
    for px, py in (on_screen(browser, tile["x"] + f / 2, tile["y"]), on_screen(browser, tile["x"], tile["y"] + f / 2)):
        assert img[int(round(py)), int(round(px))].max() < 60  # the black outline marks the tile flown to
    # the ground-truth lesion and the tissue contour are drawn
    assert browser.eval("document.querySelectorAll('#shapes path.annotation, #shapes path.tissue').length") == 2
    # the address holds the view: a fresh page at it shows the same place, zoom, layer and opacity
    href = browser.eval("location.href")
    assert "x=" in href and "layer=attention" in href and "opacity=0.80" in href
    browser.goto("about:blank")
    browser.goto(href)
    assert browser.wait_for("document.body.dataset.ready", 30) == "1"
    browser.wait_for("!!wsiView.overlayItem", 30)
    settle(browser)
    x2, y2, z2 = view(browser)
    assert abs(x2 - x) <= 1 and abs(y2 - y) <= 1 and abs(z2 / z - 1) < 1e-3
    assert browser.eval("[document.getElementById('layer').value, wsiView.overlayItem.getOpacity(), "
                        "document.getElementById('ann').checked]") == ["attention", 0.8, True]
    browser.screenshot(shots / "restored_view.png")


def test_keys_step_to_the_next_and_previous_slide_and_unviewable_slides_say_why(
    browser: Browser, server: ViewerServer, shots: Path
) -> None:
    info = open_slide_page(browser, server, "normal_b")
    nxt = browser.eval("document.getElementById('next') && document.getElementById('next').getAttribute('href')")
    assert nxt and info["scored_by_text"].startswith("IN-SAMPLE")
    assert browser.eval("getComputedStyle(document.getElementById('scored-by')).color") == "rgb(176, 0, 0)"
    browser.key("n")
    browser.wait_for(f"location.pathname === {json.dumps(nxt)}")
    assert browser.wait_for("document.body.dataset.ready", 30) == "1"
    browser.key("p")
    browser.wait_for("location.pathname === '/slide/normal_b'")
    browser.goto(f"{server.url}slide/swapped")
    assert browser.wait_for("document.body.dataset.ready", 20) == "unavailable"
    assert "another slide file" in browser.eval("document.getElementById('unavailable').textContent")
    browser.screenshot(shots / "unavailable.png")


def test_the_static_review_page_links_each_slide_to_its_viewer_page(
    browser: Browser, server: ViewerServer, run: ViewerRun
) -> None:
    page = (run.root / "heatmaps" / "index.html").as_uri()
    browser.goto(f"{page}?viewer={server.url.rstrip('/')}")
    browser.wait_for("document.documentElement.dataset.viewer", 20)
    links = browser.eval("Array.from(document.querySelectorAll('a.viewer')).map(a => a.href)")
    assert sorted(links) == sorted(f"{server.url}slide/{quote(s)}" for s in VIEWABLE)
    browser.goto(f"{server.url}review/index.html")  # served by the viewer itself
    browser.wait_for("document.documentElement.dataset.viewer && document.documentElement.dataset.imagesOk", 20)
    assert browser.eval("document.querySelectorAll('a.viewer').length") == len(VIEWABLE)
    assert browser.eval("document.documentElement.dataset.imagesBroken") == "0"
