"""The review page in a real browser: headless Chromium (Debian's ``chromium``; ``.ci/run`` installs it).

The page marks, after loading, how many images loaded and which failed (``<html data-images-ok
data-images-broken>``); Chromium's ``--dump-dom`` gives the DOM after the load event. A screenshot is
written next to the outputs for a person to look at.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from test_heatmap import make_case

from wsi_mil.config.heatmap import HeatmapConfig
from wsi_mil.runs.heatmap import run_heatmap

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or (
    "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
)
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
    "--virtual-time-budget=10000",
]


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=120, check=False)


def dump_dom(url: str) -> str:
    proc = chromium("--dump-dom", url)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def image_check(page: Path) -> tuple[int, int, int, str]:
    """(images in the page, loaded, broken, broken sources) as the browser saw them."""
    dom = dump_dom(page.as_uri())
    tag = re.search(r"<html[^>]*>", dom)
    assert tag, dom[:500]
    attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', tag.group(0)))
    assert "images-ok" in attrs, f"the page's check script did not run: {tag.group(0)}"
    n_img = len(re.findall(r"<img\b", dom))
    return n_img, int(attrs["images-ok"]), int(attrs["images-broken"]), attrs.get("broken-src", "")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install chromium; "
                                               ".ci/run installs it)")
def test_review_page_loads_every_image_in_chromium(tmp_path: Path) -> None:
    a = make_case(tmp_path, "case 01 é", size=(2400, 1800), mark=(5, 4))  # R22: spaces and unicode in links
    b = make_case(tmp_path, "case02", size=(1600, 1200), mark=(3, 2), label="normal", bag=(0.6, 0.4), seed=2)
    c = make_case(tmp_path, "case03", size=(1600, 1200), mark=None, n_tiles=0, label="normal", bag=(0.9, 0.1))
    out = tmp_path / "review"
    result = run_heatmap([a.slide, b.slide, c.slide], tmp_path / "predict", out, HeatmapConfig(max_side_px=600),
                         progress=False)
    assert result.exit_code == 0 and result.index_html == out / "index.html"
    n_img, ok, broken, srcs = image_check(out / "index.html")
    assert n_img == 1 + 3 * 3  # legend + thumbnail, overlay, top tiles per slide
    assert (ok, broken) == (n_img, 0), srcs
    shot = out / "screenshot.png"
    proc = chromium("--window-size=1400,1400", f"--screenshot={shot}", (out / "index.html").as_uri())
    assert proc.returncode == 0 and shot.stat().st_size > 20_000
    # the class filter, preset from the address: predicted "normal" hides the slide predicted "tumor"
    dom = dump_dom((out / "index.html").as_uri() + "?pred=normal")
    shown = re.findall(r'<section class="slide" id="([^"]+)"', dom)
    hidden = re.findall(r'<section class="slide hidden" id="([^"]+)"', dom)
    assert sorted(shown) == ["case02", "case03"] and hidden == ["case 01 é"]
    assert "2 of 3 slides shown" in dom
    # the check really detects a missing image
    (out / "case02" / "overlay.jpg").unlink()
    n_img, ok, broken, srcs = image_check(out / "index.html")
    assert broken == 1 and ok == n_img - 1 and "case02/overlay.jpg" in srcs
