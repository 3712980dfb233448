/* wsi-mil view, the slide page: OpenSeadragon with the slide, the model's evidence layer, contours,
   annotations, legend, galleries, hover read-out, keyboard navigation and the view in the URL.
   State in the address (#x=&y=&z=&layer=&class=&opacity=&overlay=&smooth=&tissue=&ann=): x, y the
   level-0 pixel at the centre, z screen pixels per level-0 pixel. window.wsiView exposes the viewer. */
(function () {
  'use strict';
  var slideId = document.body.dataset.slideId;
  var enc = encodeURIComponent;
  var app = document.getElementById('app');
  var state = {layer: null, cls: null, opacity: 0.5, overlay: true, smooth: false, tissue: false, ann: false};
  var info = null, layerInfo = null, viewer = null, slideItem = null, overlayItem = null;
  var shapes = {tissue: null, ann: null};
  var api = window.wsiView = {ready: false, state: state};

  function el(tag, attrs, children) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === 'text') { e.textContent = attrs[k]; } else if (k === 'html') { e.innerHTML = attrs[k]; }
      else if (k.slice(0, 2) === 'on') { e.addEventListener(k.slice(2), attrs[k]); } else { e.setAttribute(k, attrs[k]); }
    });
    (children || []).forEach(function (c) { if (c) { e.appendChild(typeof c === 'string' ? document.createTextNode(c) : c); } });
    return e;
  }
  function getJSON(url) {
    return fetch(url).then(function (r) {
      if (!r.ok) { return r.text().then(function (t) { throw new Error(r.status + ' ' + t); }); }
      return r.json();
    });
  }
  function fmt(v, digits) { return (v === null || v === undefined || isNaN(v)) ? '–' : Number(v).toFixed(digits); }
  function fmtValue(layer, v) {
    if (layer === 'attention') {  // log2(n·α), clipped at ±4
      var m = Math.pow(2, v), text = m >= 10 ? m.toFixed(0) : m.toPrecision(2);
      return 'n·α ' + (v >= 4 ? '≥ ' : (v <= -4 ? '≤ ' : '')) + text + '×';
    }
    if (layer === 'rank') { return fmt(v, 1) + ' pct'; }
    return fmt(v, 3);
  }

  // --- the address ---------------------------------------------------------------------------------
  function readHash() {
    var q = new URLSearchParams(location.hash.slice(1));
    var out = {};
    q.forEach(function (v, k) { out[k] = v; });
    return out;
  }
  function applyHashOptions(h) {
    if (h.layer && info.layers.indexOf(h.layer) >= 0) { state.layer = h.layer; }
    if (h['class'] && info.classes.indexOf(h['class']) >= 0) { state.cls = h['class']; }
    if (h.opacity !== undefined && !isNaN(parseFloat(h.opacity))) { state.opacity = Math.max(0, Math.min(1, parseFloat(h.opacity))); }
    if (h.overlay !== undefined) { state.overlay = h.overlay !== '0'; }
    if (h.smooth !== undefined) { state.smooth = h.smooth === '1'; }
    if (h.tissue !== undefined) { state.tissue = h.tissue === '1' && info.has_tissue; }
    if (h.ann !== undefined) { state.ann = h.ann === '1' && info.has_annotations; }
  }
  function optionsHash() {
    return 'layer=' + enc(state.layer) + '&class=' + enc(state.cls) + '&opacity=' + state.opacity.toFixed(2) +
      '&overlay=' + (state.overlay ? 1 : 0) + '&smooth=' + (state.smooth ? 1 : 0) +
      '&tissue=' + (state.tissue ? 1 : 0) + '&ann=' + (state.ann ? 1 : 0);
  }
  function view() {
    var vp = viewer.viewport;
    var c = slideItem.viewportToImageCoordinates(vp.getCenter(true));
    var z = slideItem.viewportToImageZoom(vp.getZoom(true));
    return {x: c.x, y: c.y, z: z};
  }
  function writeHash() {
    if (!slideItem) { return; }
    var v = view();
    var h = '#x=' + Math.round(v.x) + '&y=' + Math.round(v.y) + '&z=' + v.z.toPrecision(4) + '&' + optionsHash();
    if (h !== location.hash) { history.replaceState(null, '', h); }
    var link = document.getElementById('link-text');
    if (link) { link.value = location.href; }
  }
  function goTo(x, y, z, immediately) {
    var vp = viewer.viewport;
    vp.zoomTo(slideItem.imageToViewportZoom(z), null, immediately);
    vp.panTo(slideItem.imageToViewportCoordinates(x, y), immediately);
  }
  function restoreView(h, immediately) {
    var x = parseFloat(h.x), y = parseFloat(h.y), z = parseFloat(h.z);
    if (isFinite(x) && isFinite(y) && isFinite(z) && z > 0) { goTo(x, y, z, immediately); return true; }
    return false;
  }

  // --- neighbours (the cohort page's order when it set one) ----------------------------------------------
  function neighbours() {
    var order = null;
    try { order = JSON.parse(sessionStorage.getItem('wsiOrder') || 'null'); } catch (e) { order = null; }
    if (Array.isArray(order) && order.indexOf(slideId) >= 0) {
      var k = order.indexOf(slideId);
      return {previous: k > 0 ? order[k - 1] : null, next: k + 1 < order.length ? order[k + 1] : null};
    }
    return {previous: info.previous || null, next: info.next || null};
  }
  function openSlide(id) {
    if (id) { location.href = '/slide/' + enc(id) + '#' + optionsHash(); }
  }

  // --- header and side panel -----------------------------------------------------------------------
  function header(nb) {
    var verdict = info.correct === null ? el('span', {'class': 'badge na', text: 'no label'}) :
      el('span', {'class': 'badge ' + (info.correct ? 'ok' : 'bad'), text: info.correct ? 'correct' : 'misclassified'});
    var p = info.probability === null ? '' : ' (P = ' + fmt(info.probability, 3) + ')';
    var scored = el('span', {'class': info.in_sample ? 'bad' : 'muted', id: 'scored-by',
                             text: info.scored_by_text ? 'scored by: ' + info.scored_by_text : ''});
    return el('header', {}, [
      el('span', {'class': 'nav'}, [
        el('a', {href: '/', text: '← cohort'}),
        nb.previous ? el('a', {href: '/slide/' + enc(nb.previous), id: 'prev', text: '‹ previous', title: 'key p'}) : null,
        nb.next ? el('a', {href: '/slide/' + enc(nb.next), id: 'next', text: 'next ›', title: 'key n'}) : null,
      ]),
      el('span', {'class': 'id', text: slideId}),
      el('span', {}, ['Prediction: ', el('b', {text: info.predicted_class || 'none'}), p]),
      el('span', {}, ['True label: ', el('b', {text: info.label || 'unknown'}), ' ', verdict]),
      scored,
      info.review ? el('a', {href: info.review, text: 'review page'}) : null,
    ]);
  }

  function sidePanel() {
    var layerSel = el('select', {id: 'layer'});
    var names = {probability: 'P(class) of each tile', attention: 'attention n·α (log scale)', rank: 'attention rank (this slide)'};
    info.layers.forEach(function (l) { layerSel.appendChild(el('option', {value: l, text: names[l] || l})); });
    layerSel.value = state.layer;
    layerSel.addEventListener('change', function () { state.layer = layerSel.value; changeLayer(); });
    var clsSel = el('select', {id: 'class'});
    info.classes.forEach(function (c) { clsSel.appendChild(el('option', {value: c, text: c})); });
    clsSel.value = state.cls;
    clsSel.addEventListener('change', function () { state.cls = clsSel.value; changeLayer(); });
    var opacity = el('input', {type: 'range', id: 'opacity', min: '0', max: '1', step: '0.05', value: String(state.opacity)});
    opacity.addEventListener('input', function () { state.opacity = parseFloat(opacity.value); showOverlay(); writeHash(); });
    function toggle(id, key, label, title, enabled, onchange) {
      var box = el('input', {type: 'checkbox', id: id});
      box.checked = state[key];
      if (!enabled) { box.disabled = true; }
      box.addEventListener('change', function () { state[key] = box.checked; onchange(); writeHash(); });
      return el('label', {title: title}, [box, label]);
    }
    return el('aside', {'class': 'side'}, [
      el('h2', {text: 'Evidence layer'}),
      el('div', {'class': 'row'}, [layerSel]),
      el('div', {'class': 'row', id: 'class-row'}, [el('label', {}, ['class ', clsSel])]),
      el('div', {'class': 'row'}, [
        toggle('overlay', 'overlay', 'show', 'key o', true, showOverlay),
        toggle('smooth', 'smooth', 'smoothed', 'key b: Gaussian over the tile cells (σ = 0.75 tile); off: crisp cells', true, changeLayer),
      ]),
      el('div', {'class': 'row'}, [el('label', {}, ['opacity ', opacity])]),
      el('div', {'class': 'row'}, [
        toggle('tissue', 'tissue', 'tissue contour', 'key t', info.has_tissue, drawShapes),
        toggle('ann', 'ann', 'annotations', 'key g: ground truth (GeoJSON)', info.has_annotations, drawShapes),
      ]),
      el('div', {'class': 'legend', id: 'legend'}),
      el('h2', {id: 'top-title', text: 'Highest tiles'}),
      el('div', {'class': 'gallery', id: 'top'}),
      el('h2', {id: 'bottom-title', text: 'Lowest tiles'}),
      el('div', {'class': 'gallery', id: 'bottom'}),
      el('h2', {text: 'This view'}),
      el('div', {'class': 'row link'}, [
        el('input', {id: 'link-text', readonly: 'readonly', value: location.href}),
        el('button', {id: 'copy-link', text: 'copy link', onclick: function () {
          writeHash();
          var t = document.getElementById('link-text');
          t.select();
          if (navigator.clipboard) { navigator.clipboard.writeText(location.href).catch(function () {}); }
        }}),
      ]),
      el('div', {'class': 'keys', html: '<kbd>n</kbd>/<kbd>p</kbd> next/previous slide · <kbd>o</kbd> overlay · ' +
        '<kbd>b</kbd> smoothed · <kbd>t</kbd> tissue · <kbd>g</kbd> annotations · <kbd>0</kbd> whole slide'}),
      el('p', {'class': 'muted', text: info.n_tiles + ' tiles of ' + info.tile_px + ' px at ' + fmt(info.tile_mpp, 3) +
        ' µm/px (level-0 footprint ' + fmt(info.footprint, 1) + ' px); slide ' + info.width + ' × ' + info.height +
        ' px at ' + fmt(info.mpp, 4) + ' µm/px.'}),
    ]);
  }

  // --- legend and galleries ---------------------------------------------------------------------------
  function drawLegend() {
    var box = document.getElementById('legend');
    box.innerHTML = '';
    var canvas = el('canvas', {width: '256', height: '1', id: 'colorbar'});
    var ctx = canvas.getContext('2d');
    info.lut.forEach(function (hex, k) { ctx.fillStyle = hex; ctx.fillRect(k, 0, 1, 1); });
    var ticks = el('div', {'class': 'ticks'});
    var span = layerInfo.vmax - layerInfo.vmin || 1;
    layerInfo.ticks.forEach(function (t, k) {
      var pos = (t - layerInfo.vmin) / span * 100;
      var shift = pos <= 0 ? '-8px' : (pos >= 100 ? 'calc(-100% + 8px)' : '-50%');  // end labels stay inside
      ticks.appendChild(el('span', {style: 'left:' + pos + '%;transform:translateX(' + shift + ')', text: layerInfo.tick_labels[k]}));
    });
    var tone = {probability: ' ok', rank: ' bad'}[layerInfo.name] || '';
    var scale = el('div', {'class': 'scale' + tone, id: 'scale-note', text: layerInfo.scale_note});
    box.appendChild(el('div', {'class': 'title', id: 'legend-title', text: layerInfo.label}));
    box.appendChild(canvas);
    box.appendChild(ticks);
    box.appendChild(scale);
    box.appendChild(el('div', {'class': 'muted', text: 'Uncoloured: not scored (glass, or tissue without a tile).'}));
  }
  function gallery(id, tiles, title, titleText) {
    var g = document.getElementById(id);
    g.innerHTML = '';
    document.getElementById(title).textContent = titleText;
    tiles.forEach(function (t, k) {
      var v = t.values[state.layer];
      var fig = el('figure', {'data-index': String(t.index), 'data-x': String(t.x), 'data-y': String(t.y),
                              'data-value': String(v), title: readoutText(t)}, [
        el('img', {src: '/crop/' + enc(slideId) + '/' + t.index + '.jpeg', alt: 'tile ' + t.index, loading: 'lazy'}),
        el('figcaption', {text: '#' + (k + 1) + ' ' + fmtValue(state.layer, v)}),
      ]);
      fig.addEventListener('click', function () { flyTo(t); });
      g.appendChild(fig);
    });
  }
  function flyTo(t) {
    var f = info.footprint;
    Array.prototype.forEach.call(document.querySelectorAll('.gallery figure'), function (x) {
      x.classList.toggle('active', x.dataset.index === String(t.index));
    });
    var rect = slideItem.imageToViewportRectangle(t.x - f, t.y - f, 3 * f, 3 * f);
    viewer.viewport.fitBounds(rect, false);
    api.target = t;
    drawShapes();
  }

  // --- the evidence layer ---------------------------------------------------------------------------
  function overlaySource() {
    var q = '?class=' + enc(state.cls) + (state.smooth ? '&smooth=1' : '');
    return {
      width: info.width, height: info.height, tileSize: info.tile_size, tileOverlap: info.overlap,
      minLevel: 0, maxLevel: info.max_level,
      getTileUrl: function (level, x, y) {
        return '/overlay/' + enc(slideId) + '/' + state.layer + '/' + level + '/' + x + '_' + y + '.png' + q;
      },
    };
  }
  function showOverlay() {
    if (overlayItem) { overlayItem.setOpacity(state.overlay ? state.opacity : 0); }
    var box = document.getElementById('overlay');
    if (box) { box.checked = state.overlay; }
  }
  function changeLayer() {
    document.getElementById('class-row').style.display = state.layer === 'probability' ? '' : 'none';
    var old = overlayItem;
    viewer.addTiledImage({
      tileSource: overlaySource(), x: 0, y: 0, width: 1, opacity: state.overlay ? state.opacity : 0,
      success: function (e) {
        overlayItem = e.item;
        api.overlayItem = overlayItem;
        if (old) { viewer.world.removeItem(old); }
      },
    });
    var url = '/api/slide/' + enc(slideId) + '/layer/' + state.layer + '?class=' + enc(state.cls);
    return getJSON(url).then(function (li) {
      layerInfo = li;
      api.layerInfo = li;
      drawLegend();
      var what = state.layer === 'probability' ? 'P(' + state.cls + ')' : (state.layer === 'rank' ? 'attention rank' : 'attention');
      gallery('top', li.top, 'top-title', 'Highest ' + li.top.length + ' tiles by ' + what);
      gallery('bottom', li.bottom, 'bottom-title', 'Lowest ' + li.bottom.length + ' tiles by ' + what);
      writeHash();
    });
  }

  // --- contours, annotations and tile outlines (SVG over the viewer, in level-0 pixels) ----------------
  var svgNS = 'http://www.w3.org/2000/svg';
  function svgEl(tag, attrs) {
    var e = document.createElementNS(svgNS, tag);
    Object.keys(attrs).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    return e;
  }
  function pathOf(polygons) {
    return polygons.map(function (p) {
      return p.rings.map(function (r) {
        return 'M' + r.map(function (pt) { return pt[0] + ' ' + pt[1]; }).join('L') + 'Z';
      }).join('');
    }).join('');
  }
  function loadShapes(which) {
    if (shapes[which] !== null) { return Promise.resolve(shapes[which]); }
    var name = which === 'ann' ? 'annotations' : 'tissue';
    return getJSON('/api/slide/' + enc(slideId) + '/' + name + '.json').then(function (d) {
      shapes[which] = d.polygons;
      return d.polygons;
    });
  }
  function drawShapes() {
    var g = document.getElementById('shapes-g');
    if (!g) { return; }
    g.innerHTML = '';
    var jobs = [];
    if (state.tissue) { jobs.push(loadShapes('tissue').then(function (p) { g.appendChild(svgEl('path', {'class': 'tissue', d: pathOf(p)})); })); }
    if (state.ann) { jobs.push(loadShapes('ann').then(function (p) { g.appendChild(svgEl('path', {'class': 'annotation', d: pathOf(p)})); })); }
    var f = info.footprint;
    if (api.target) { g.appendChild(svgEl('rect', {'class': 'target', x: api.target.x, y: api.target.y, width: f, height: f})); }
    g.appendChild(svgEl('rect', {'class': 'hover', id: 'hover-rect', x: 0, y: 0, width: f, height: f, visibility: 'hidden'}));
    return Promise.all(jobs);
  }
  function placeShapes() {
    var g = document.getElementById('shapes-g');
    if (!g || !slideItem) { return; }
    var a = viewer.viewport.pixelFromPoint(slideItem.imageToViewportCoordinates(0, 0), true);
    var b = viewer.viewport.pixelFromPoint(slideItem.imageToViewportCoordinates(info.width, 0), true);
    var s = (b.x - a.x) / info.width;
    g.setAttribute('transform', 'translate(' + a.x + ',' + a.y + ') scale(' + s + ')');
    var mpp = info.mpp, bar = document.getElementById('scalebar');
    if (mpp && bar) {
      var umPerPx = mpp / s, target = umPerPx * 120, nice = Math.pow(10, Math.floor(Math.log10(target)));
      [5, 2, 1].some(function (m) { if (m * nice <= target) { nice = m * nice; return true; } return false; });
      var text = nice >= 1000 ? (nice / 1000) + ' mm' : nice + ' µm';
      bar.innerHTML = '';
      bar.appendChild(el('div', {'class': 'bar', style: 'width:' + (nice / umPerPx).toFixed(1) + 'px'}));
      bar.appendChild(document.createTextNode(text + ' · ' + umPerPx.toPrecision(3) + ' µm/px on screen (≈ ' +
        (10 / umPerPx).toPrecision(2) + '×)'));
    }
  }

  // --- hover read-out -----------------------------------------------------------------------------------
  function readoutText(t) {
    var probs = Object.keys(t.probabilities).map(function (c) { return 'P(' + c + ') ' + fmt(t.probabilities[c], 3); }).join(', ');
    return 'tile ' + t.index + ' at (' + t.x + ', ' + t.y + '): attention ' + t.attention.toExponential(3) +
      ' (rank ' + t.attention_rank + ' of ' + t.n_tiles + ', n·α ' + fmt(t.n_alpha, 2) + '×), ' + probs;
  }
  var hover = {busy: false, next: null, last: ''};
  function askTileAt(p) {
    if (hover.busy) { hover.next = p; return; }
    var key = Math.round(p.x) + ',' + Math.round(p.y);
    if (key === hover.last) { return; }
    hover.busy = true;
    hover.last = key;
    getJSON('/api/slide/' + enc(slideId) + '/tile_at?x=' + p.x.toFixed(1) + '&y=' + p.y.toFixed(1) + '&class=' + enc(state.cls))
      .then(function (t) {
        var box = document.getElementById('readout'), rect = document.getElementById('hover-rect');
        box.textContent = t ? readoutText(t) : '';
        api.hovered = t;
        if (rect) {
          rect.setAttribute('visibility', t ? 'visible' : 'hidden');
          if (t) { rect.setAttribute('x', t.x); rect.setAttribute('y', t.y); }
        }
      })
      .catch(function () {})
      .then(function () {
        hover.busy = false;
        if (hover.next) { var n = hover.next; hover.next = null; askTileAt(n); }
      });
  }

  // --- start ------------------------------------------------------------------------------------------
  function unavailable() {
    var nb = neighbours();
    app.className = 'slidepage';
    app.appendChild(header(nb));
    app.appendChild(el('div', {'class': 'banner', id: 'unavailable'}, [
      el('b', {text: 'This slide cannot be shown: ' + info.status}), el('br'), info.reason || '',
    ]));
    document.body.dataset.ready = 'unavailable';
  }

  function start() {
    var nb = neighbours();
    app.className = 'slidepage';
    app.appendChild(header(nb));
    var stage = el('div', {'class': 'stage'}, [
      el('div', {id: 'osd'}),
      el('div', {id: 'readout', 'class': 'readout'}),
      el('div', {id: 'scalebar', 'class': 'scalebar'}),
    ]);
    var svg = svgEl('svg', {id: 'shapes'});
    svg.appendChild(svgEl('g', {id: 'shapes-g'}));
    stage.appendChild(svg);
    app.appendChild(el('div', {'class': 'body'}, [stage, sidePanel()]));
    viewer = OpenSeadragon({
      element: document.getElementById('osd'),
      prefixUrl: '/vendor/openseadragon/images/',
      drawer: 'canvas',
      showNavigator: true, navigatorPosition: 'BOTTOM_RIGHT',
      showRotationControl: false, showFullPageControl: false,
      maxZoomPixelRatio: 4, visibilityRatio: 0.1, constrainDuringPan: false,
      animationTime: 0.5, imageLoaderLimit: 8, timeout: 60000,
      gestureSettingsMouse: {clickToZoom: false},
      tileSources: {
        width: info.width, height: info.height, tileSize: info.tile_size, tileOverlap: info.overlap,
        minLevel: 0, maxLevel: info.max_level,
        getTileUrl: function (level, x, y) { return '/tiles/' + enc(slideId) + '/' + level + '/' + x + '_' + y + '.jpeg'; },
      },
    });
    api.viewer = viewer;
    viewer.addOnceHandler('open', function () {
      slideItem = viewer.world.getItemAt(0);
      api.slideItem = slideItem;
      var h = readHash();
      restoreView(h, true);
      changeLayer().then(function () {
        return drawShapes();
      }).then(function () {
        placeShapes();
        slideItem.whenFullyLoaded(function () {
          api.ready = true;
          document.body.dataset.ready = '1';
        });
      });
    });
    viewer.addHandler('update-viewport', placeShapes);
    viewer.addHandler('animation-finish', writeHash);
    new OpenSeadragon.MouseTracker({
      element: viewer.canvas,
      moveHandler: function (e) {
        if (!slideItem) { return; }
        askTileAt(viewer.viewport.viewerElementToImageCoordinates(e.position));
      },
      leaveHandler: function () {
        document.getElementById('readout').textContent = '';
        var rect = document.getElementById('hover-rect');
        if (rect) { rect.setAttribute('visibility', 'hidden'); }
        hover.last = '';
      },
    });
    window.addEventListener('hashchange', function () {
      var h = readHash();
      var before = optionsHash();
      applyHashOptions(h);
      restoreView(h, false);
      if (optionsHash() !== before) {
        ['layer', 'class'].forEach(function (id) { document.getElementById(id).value = state[id === 'class' ? 'cls' : id]; });
        document.getElementById('opacity').value = String(state.opacity);
        ['smooth', 'tissue', 'ann'].forEach(function (k) { document.getElementById(k).checked = state[k]; });
        changeLayer();
        showOverlay();
        drawShapes();
      }
    });
    document.addEventListener('keydown', function (e) {
      if (e.ctrlKey || e.metaKey || e.altKey || /^(INPUT|SELECT|TEXTAREA)$/.test(e.target.tagName)) { return; }
      var toggles = {o: 'overlay', b: 'smooth', t: 'tissue', g: 'ann'};
      if (e.key === 'n' || e.key === ']') { openSlide(nb.next); }
      else if (e.key === 'p' || e.key === '[') { openSlide(nb.previous); }
      else if (toggles[e.key]) {
        var box = document.getElementById(toggles[e.key]);
        if (!box.disabled) { box.checked = !box.checked; box.dispatchEvent(new Event('change')); }
      } else { return; }
      e.preventDefault();
    });
  }

  getJSON('/api/slide/' + enc(slideId)).then(function (d) {
    info = d;
    api.info = d;
    if (!d.viewable) { unavailable(); return; }
    state.layer = d.default_layer;
    state.cls = d.default_class;
    applyHashOptions(readHash());
    start();
  }).catch(function (err) {
    app.appendChild(el('div', {'class': 'banner', text: 'Could not load this slide: ' + err.message}));
    document.body.dataset.ready = 'error';
  });
})();
