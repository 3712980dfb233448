"""``DIR/index.html``: one static page to review a cohort's heatmaps in a browser.

No server and no network: relative links only, a few lines of inline JavaScript, no CDN. Slides are
listed by predicted probability (of the positive class for binary models, else of the predicted
class), highest first, each with its prediction, true label, thumbnail, heatmap overlay and top
tiles; filters by predicted class and true label, and a "misclassified only" switch (also preset from
the address: ``index.html?pred=tumor&label=normal&wrong=1``). Slides that were
not rendered (failed, no scores) are listed at the end with the reason. When ``wsi-mil view`` serves
the run (the page under its ``/review/``, or a viewer at ``?viewer=URL``, by default the viewer's
default address), each slide it can show links to its zoomable viewer page; without one the page
works as before.

After loading, the page marks every image that failed to load (class ``broken``, red outline) and
records the counts on ``<html data-images-ok=.. data-images-broken=..>``; the browser test reads them.
"""

from __future__ import annotations

import html
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from wsi_mil.cohort.scoring import describe_scored_by
from wsi_mil.config.heatmap import HeatmapConfig
from wsi_mil.heatmap.render import TileValues, render_colorbar
from wsi_mil.store import RecordStore, atomic_write_bytes, atomic_write_text, folder_lock

logger = logging.getLogger(__name__)

#: Above this many slides images load lazily (as they scroll into view).
LAZY_LOADING_FROM = 60

_CSS = """
:root { --fg:#1d1d1f; --muted:#5f6368; --line:#dadce0; --ok:#1b7a1b; --bad:#b00000; }
* { box-sizing: border-box; }
body { font: 15px/1.45 "DejaVu Sans", "Segoe UI", Helvetica, Arial, sans-serif; color: var(--fg);
       background: #fff; margin: 0; }
header { position: sticky; top: 0; background: #fff; border-bottom: 1px solid var(--line);
         padding: 10px 20px; z-index: 2; }
h1 { font-size: 20px; margin: 0 0 6px 0; }
.controls { display: flex; flex-wrap: wrap; gap: 16px; align-items: center; }
.controls label { color: var(--muted); }
select { font-size: 14px; padding: 2px 4px; }
.legend img { height: 70px; vertical-align: middle; }
main { padding: 8px 20px 40px 20px; }
.slide { border-bottom: 1px solid var(--line); padding: 14px 0; display: grid;
         grid-template-columns: 250px 1fr; gap: 16px; }
.meta h2 { font-size: 17px; margin: 0 0 4px 0; word-break: break-all; }
.meta .pred { font-size: 16px; }
.bar { height: 8px; background: #eee; border-radius: 4px; margin: 4px 0 8px 0; width: 200px; }
.bar span { display: block; height: 8px; border-radius: 4px; background: #444; }
.badge { display: inline-block; padding: 0 6px; border-radius: 4px; font-size: 13px; color: #fff; }
.badge.ok { background: var(--ok); } .badge.bad { background: var(--bad); } .badge.na { background: #888; }
.note { color: var(--bad); font-weight: bold; }
.meta .small { color: var(--muted); font-size: 13px; }
.meta a { font-size: 13px; margin-right: 8px; }
.meta a.viewer { display: inline-block; margin-top: 6px; font-weight: bold; }
.images { display: flex; flex-wrap: wrap; gap: 10px; align-items: flex-start; }
.images figure { margin: 0; }
.images figcaption { font-size: 12px; color: var(--muted); }
.images img { max-height: 250px; max-width: 300px; border: 1px solid var(--line); background: #fafafa; }
.images img.sheet { max-height: 250px; max-width: 400px; }
img.broken { outline: 3px solid var(--bad); min-width: 80px; min-height: 40px; }
table { border-collapse: collapse; margin-top: 8px; }
td, th { border-bottom: 1px solid var(--line); padding: 4px 10px; text-align: left; vertical-align: top; }
.hidden { display: none; }
"""

_JS = """
(function () {
  var cards = Array.prototype.slice.call(document.querySelectorAll('.slide'));
  var pred = document.getElementById('f-pred'), lab = document.getElementById('f-label');
  var wrong = document.getElementById('f-wrong'), count = document.getElementById('shown');
  function apply() {
    var n = 0;
    cards.forEach(function (c) {
      var show = (pred.value === '' || c.dataset.pred === pred.value) &&
                 (lab.value === '' || c.dataset.label === lab.value) &&
                 (!wrong.checked || c.dataset.correct === 'no');
      c.classList.toggle('hidden', !show);
      if (show) { n += 1; }
    });
    count.textContent = n + ' of ' + cards.length + ' slides shown';
  }
  [pred, lab, wrong].forEach(function (el) { el.addEventListener('change', apply); });
  // Filters can be preset in the address: index.html?pred=tumor&label=normal&wrong=1
  var q = new URLSearchParams(window.location.search);
  if (q.has('pred')) { pred.value = q.get('pred'); }
  if (q.has('label')) { lab.value = q.get('label'); }
  if (q.get('wrong') === '1') { wrong.checked = true; }
  apply();
  window.addEventListener('load', function () {
    var ok = 0, broken = [];
    Array.prototype.forEach.call(document.images, function (img) {
      if (img.complete && img.naturalWidth === 0) { img.classList.add('broken'); broken.push(img.getAttribute('src')); }
      else if (img.complete) { ok += 1; }
    });
    document.documentElement.dataset.imagesOk = String(ok);
    document.documentElement.dataset.imagesBroken = String(broken.length);
    document.documentElement.dataset.brokenSrc = broken.join(' ');
  });
  // When `wsi-mil view` serves this run (this page under its /review/, or a viewer at ?viewer=URL, default
  // __VIEWER__), each slide it can show gets a link to its zoomable page; otherwise nothing changes.
  var base = q.get('viewer') || (location.protocol.indexOf('http') === 0 ? '' : '__VIEWER__');
  fetch(base + '/api/ping').then(function (r) { return r.json(); }).then(function (d) {
    if (!d || d.app !== 'wsi-mil view') { return; }
    var ids = {};
    d.slides.forEach(function (id) { ids[id] = true; });
    cards.forEach(function (c) {
      if (!ids[c.id]) { return; }
      var a = document.createElement('a');
      a.className = 'viewer';
      a.href = base + '/slide/' + encodeURIComponent(c.id);
      a.textContent = 'open in the viewer';
      c.querySelector('.meta').appendChild(a);
    });
    document.documentElement.dataset.viewer = base || location.origin;
  }).catch(function () { /* no viewer running: the page works on its own */ });
})();
"""


def _viewer_url() -> str:
    """Where ``wsi-mil view`` listens by default (the page looks for it there when opened from disk)."""
    from wsi_mil.config.view import ViewConfig

    return f"http://127.0.0.1:{ViewConfig().port}"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _href(slide_id: str, name: str) -> str:
    return _e(quote(f"{slide_id}/{name}"))


def _scored_by_line(s: dict[str, Any]) -> str:
    """How the slide was scored; in red when a model that scored it trained on it."""
    scored_by = str(s.get("scored_by", ""))
    words = describe_scored_by(scored_by, int(s.get("n_checkpoints", 1) or 1))
    if not words:
        return ""
    style = ' style="color:#b00000;font-weight:bold"' if scored_by.startswith("in_sample:") else ""
    return f'<div class="small scored"{style}>scored by: {_e(words)}</div>'


def _card(s: dict[str, Any], lazy: bool) -> str:
    sid = str(s["slide_id"])
    files = s.get("files", {})
    pred = str(s.get("predicted_class", ""))
    label = str(s.get("label", "") or "")
    prob = float(s.get("probability", math.nan))
    sort_cls, sort_p = str(s.get("sort_class", pred)), float(s.get("sort_probability", math.nan))
    if label:
        correct = "yes" if label == pred else "no"
        badge = '<span class="badge ok">correct</span>' if correct == "yes" else '<span class="badge bad">misclassified</span>'
    else:
        correct, badge = "unknown", '<span class="badge na">no label</span>'
    loading = ' loading="lazy"' if lazy else ""
    note = f'<div class="note">{_e(s["note"])}</div>' if s.get("note") else ""
    probs = ", ".join(f"{_e(k)} {float(v):.2f}" for k, v in s.get("class_probabilities", {}).items())
    width = 0.0 if not math.isfinite(sort_p) else max(0.0, min(1.0, sort_p)) * 100
    ptxt = "" if not math.isfinite(prob) else f" <b>{prob:.2f}</b>"
    fig = _href(sid, files.get("figure", "heatmap.png"))
    parts = [
        f'<section class="slide" id="{_e(sid)}" data-pred="{_e(pred)}" data-label="{_e(label or "unknown")}" '
        f'data-correct="{correct}" data-p="{sort_p:.6f}">',
        '<div class="meta">',
        f"<h2>{_e(sid)}</h2>",
        f'<div class="pred">Prediction: <b>{_e(pred)}</b>{ptxt}</div>',
        f'<div class="bar" title="P({_e(sort_cls)}) = {sort_p:.3f}"><span style="width:{width:.1f}%"></span></div>',
        f"<div>True label: <b>{_e(label or 'unknown')}</b> {badge}</div>",
        note,
        f'<div class="small">P per class: {probs}</div>',
        f'<div class="small">{int(s.get("n_tiles", 0)):,} tiles · model {_e(s.get("model", ""))}</div>',
        _scored_by_line(s),
        f'<div><a href="{fig}">figure</a><a href="{_href(sid, files.get("geojson", "tiles.geojson"))}">GeoJSON</a>'
        f'<a href="{_href(sid, files.get("top_csv", "top_tiles.csv"))}">top tiles CSV</a>'
        f'<a href="{_href(sid, files.get("hdf5", "heatmap.h5"))}">HDF5</a></div>',
        "</div>",
        '<div class="images">',
        f'<figure><a href="{fig}"><img src="{_href(sid, files.get("thumbnail", "thumbnail.jpg"))}"{loading} '
        f'alt="thumbnail of {_e(sid)}"></a><figcaption>slide</figcaption></figure>',
        f'<figure><a href="{fig}"><img src="{_href(sid, files.get("overlay", "overlay.jpg"))}"{loading} '
        f'alt="heatmap of {_e(sid)}"></a><figcaption>heatmap ({_e(s.get("score", {}).get("short", ""))})'
        "</figcaption></figure>",
        f'<figure><a href="{_href(sid, files.get("top_sheet", "top_tiles.png"))}"><img class="sheet" '
        f'src="{_href(sid, files.get("top_sheet", "top_tiles.png"))}"{loading} alt="top tiles of {_e(sid)}"></a>'
        '<figcaption>highest-scoring tiles</figcaption></figure>',
        "</div></section>",
    ]
    return "\n".join(p for p in parts if p)


def render_page(done: list[dict[str, Any]], other: list[dict[str, Any]], legend: str | None) -> str:
    """The HTML text of the review page."""
    lazy = len(done) > LAZY_LOADING_FROM
    preds = sorted({str(s.get("predicted_class", "")) for s in done})
    labels = sorted({str(s.get("label") or "unknown") for s in done})
    models = sorted({str(s.get("model", "")) for s in done if s.get("model")})
    score = done[0]["score"]["short"] if done else ""
    sort_classes = sorted({str(s.get("sort_class", "")) for s in done})
    order = f"P({sort_classes[0]})" if len(sort_classes) == 1 else "probability of the predicted class"
    opts_pred = "".join(f'<option value="{_e(p)}">{_e(p)}</option>' for p in preds)
    opts_label = "".join(f'<option value="{_e(v)}">{_e(v)}</option>' for v in labels)
    legend_html = f'<span class="legend"><img src="{_e(legend)}" alt="colour scale"></span>' if legend else ""
    n_wrong = sum(1 for s in done if s.get("label") and s.get("label") != s.get("predicted_class"))
    head = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>wsi-mil heatmaps: {len(done)} slides</title>",
        f"<style>{_CSS}</style></head><body>",
        "<header>",
        f"<h1>Heatmap review: {len(done)} slides</h1>",
        f'<div class="small">Sorted by {_e(order)}, highest first. Heatmap: {_e(score)}. '
        f"Model: {_e(', '.join(models) or 'unknown')}. {n_wrong} misclassified among labelled slides. "
        "Click an image for the full figure.</div>",
        '<div class="controls">',
        f'<label>Predicted class <select id="f-pred"><option value="">all</option>{opts_pred}</select></label>',
        f'<label>True label <select id="f-label"><option value="">all</option>{opts_label}</select></label>',
        '<label><input type="checkbox" id="f-wrong"> misclassified only</label>',
        '<span id="shown"></span>',
        legend_html,
        "</div></header><main>",
    ]
    body = [_card(s, lazy) for s in done]
    tail: list[str] = []
    if other:
        tail.append(f"<h2>Not rendered ({len(other)})</h2><table><tr><th>slide</th><th>status</th><th>reason</th></tr>")
        for r in sorted(other, key=lambda r: str(r.get("slide_id"))):
            reason = r.get("error") or r.get("note") or ""
            tail.append(
                f"<tr><td>{_e(r.get('slide_id', ''))}</td><td>{_e(r.get('status', ''))}</td><td>{_e(reason)}</td></tr>"
            )
        tail.append("</table>")
    if not done:
        tail.insert(0, "<p>No slide was rendered.</p>")
    return "\n".join(head + body + tail + ["</main>", f"<script>{_JS.replace('__VIEWER__', _viewer_url())}</script>", "</body></html>", ""])


def legend_png(out: Path, summaries: Sequence[dict[str, Any]], cfg_colormap: str) -> Path | None:
    """``DIR/legend.png``: the colour bar of the page (from the first slide's scale)."""
    for s in summaries:
        sc = s.get("score")
        if not isinstance(sc, dict):
            continue
        values = TileValues(
            np.zeros(0), str(sc["kind"]), str(sc["scale"]), float(sc["vmin"]), float(sc["vmax"]), str(sc["label"]),
            str(sc["short"]), sc.get("class_name"), tuple(float(t) for t in sc["ticks"]),
            tuple(str(t) for t in sc["tick_labels"]),
        )
        if values.kind == "probability" and len({str(x.get("sort_class")) for x in summaries}) > 1:
            values = TileValues(values.values, values.kind, values.scale, values.vmin, values.vmax,
                                "P(predicted class) of each tile", values.short, None, values.ticks,
                                values.tick_labels)
        cfg = HeatmapConfig(colormap=cfg_colormap)
        with folder_lock(out, "legend"):
            return atomic_write_bytes(out / "legend.png", render_colorbar(values, cfg))
    return None


def read_summaries(out: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(summaries of rendered slides, records of the others) from a heatmap output folder."""
    records = RecordStore(out, ()).all()  # reading needs no columns
    done, other = [], []
    for rec in records:
        sid = str(rec.get("slide_id", ""))
        if rec.get("status") == "done":
            try:
                s = json.loads((out / sid / "summary.json").read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                other.append({**rec, "status": "failed", "error": "summary.json missing or unreadable"})
                continue
            done.append(s)
        elif rec.get("status") != "locked":
            other.append(rec)
    done.sort(key=lambda s: (-float(s.get("sort_probability", 0.0) if math.isfinite(
        float(s.get("sort_probability", 0.0))) else 0.0), str(s.get("slide_id"))))
    return done, other


def write_review_page(out: str | Path, colormap: str = "turbo") -> Path:
    """Rebuild ``DIR/legend.png`` and ``DIR/index.html`` from every slide rendered into ``DIR``."""

    folder = Path(out)
    done, other = read_summaries(folder)
    legend = legend_png(folder, done, colormap)
    text = render_page(done, other, "legend.png" if legend is not None else None)
    with folder_lock(folder, "index"):
        path = atomic_write_text(folder / "index.html", text)
    logger.info("review page: %s (%d slides, %d not rendered)", path, len(done), len(other))
    return path
