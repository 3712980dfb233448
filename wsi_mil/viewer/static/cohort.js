/* wsi-mil view, the cohort page: every slide with label, prediction, probability and how it was scored;
   sortable (click a column), filterable, "misclassified first" in one click; slides that cannot be shown
   are listed below with the reason. Sort and filters live in the address (#sort=&dir=&q=&label=&pred=&wrong=).
   The order shown is kept (sessionStorage "wsiOrder") so that n/p on a slide page follow it. */
(function () {
  'use strict';
  var app = document.getElementById('app');
  var enc = encodeURIComponent;
  var data = null;
  var st = {sort: 'p', dir: 'desc', q: '', label: '', pred: '', wrong: false};

  function el(tag, attrs, children) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === 'text') { e.textContent = attrs[k]; } else if (k.slice(0, 2) === 'on') { e.addEventListener(k.slice(2), attrs[k]); }
      else { e.setAttribute(k, attrs[k]); }
    });
    (children || []).forEach(function (c) { if (c) { e.appendChild(typeof c === 'string' ? document.createTextNode(c) : c); } });
    return e;
  }
  function pOf(s) {
    var cls = data.positive_class || s.predicted_class;
    var p = s.class_probabilities ? s.class_probabilities[cls] : null;
    return (p === undefined || p === null || isNaN(p)) ? null : p;
  }
  var columns = [
    {key: 'slide', title: 'slide', value: function (s) { return s.slide_id; }},
    {key: 'label', title: 'true label', value: function (s) { return s.label || ''; }},
    {key: 'pred', title: 'prediction', value: function (s) { return s.predicted_class || ''; }},
    {key: 'p', title: 'P', value: function (s) { var p = pOf(s); return p === null ? -1 : p; }},
    {key: 'verdict', title: 'verdict', value: function (s) { return s.correct === false ? 0 : (s.correct === true ? 2 : 1); }},
    {key: 'scored', title: 'scored by', value: function (s) { return s.scored_by || ''; }},
    {key: 'tiles', title: 'tiles', value: function (s) { return s.n_tiles === null ? -1 : s.n_tiles; }},
  ];

  function readHash() {
    var q = new URLSearchParams(location.hash.slice(1));
    if (q.has('sort')) { st.sort = q.get('sort'); }
    if (q.has('dir')) { st.dir = q.get('dir') === 'asc' ? 'asc' : 'desc'; }
    st.q = q.get('q') || '';
    st.label = q.get('label') || '';
    st.pred = q.get('pred') || '';
    st.wrong = q.get('wrong') === '1';
  }
  function writeHash() {
    var h = '#sort=' + enc(st.sort) + '&dir=' + st.dir + (st.q ? '&q=' + enc(st.q) : '') +
      (st.label ? '&label=' + enc(st.label) : '') + (st.pred ? '&pred=' + enc(st.pred) : '') + (st.wrong ? '&wrong=1' : '');
    history.replaceState(null, '', h);
  }

  function sorted(rows) {
    var col = columns.filter(function (c) { return c.key === st.sort; })[0];
    var sign = st.dir === 'asc' ? 1 : -1;
    return rows.slice().sort(function (a, b) {
      if (st.sort === 'wrongfirst') {
        var wa = a.correct === false ? 0 : 1, wb = b.correct === false ? 0 : 1;
        if (wa !== wb) { return wa - wb; }
        return (columns[3].value(b) - columns[3].value(a)) || a.slide_id.localeCompare(b.slide_id);
      }
      var va = col.value(a), vb = col.value(b);
      var c = (typeof va === 'number' && typeof vb === 'number') ? va - vb : String(va).localeCompare(String(vb));
      return sign * c || a.slide_id.localeCompare(b.slide_id);
    });
  }
  function shown(s) {
    return (!st.q || s.slide_id.toLowerCase().indexOf(st.q.toLowerCase()) >= 0) &&
      (!st.label || (s.label || 'unknown') === st.label) && (!st.pred || s.predicted_class === st.pred) &&
      (!st.wrong || s.correct === false);
  }

  function row(s) {
    var p = pOf(s);
    var verdict = s.correct === null ? el('span', {'class': 'badge na', text: 'no label'}) :
      el('span', {'class': 'badge ' + (s.correct ? 'ok' : 'bad'), text: s.correct ? 'correct' : 'misclassified'});
    var href = '/slide/' + enc(s.slide_id);
    var thumb = s.thumb_level === undefined ? null :
      el('img', {src: '/tiles/' + enc(s.slide_id) + '/' + s.thumb_level + '/0_0.jpeg', alt: '', loading: 'lazy'});
    var tr = el('tr', {'class': 'slide' + (s.correct === false ? ' wrong' : ''), 'data-id': s.slide_id}, [
      el('td', {'class': 'thumb'}, [el('a', {href: href}, [thumb])]),
      el('td', {}, [el('a', {href: href, 'class': 'slide-link', text: s.slide_id})]),
      el('td', {text: s.label || 'unknown'}),
      el('td', {text: s.predicted_class || '–'}),
      el('td', {}, [p === null ? '–' : p.toFixed(3), el('span', {'class': 'pbar'},
        [el('span', {style: 'width:' + (p === null ? 0 : p * 100).toFixed(1) + '%'})])]),
      el('td', {'class': 'verdict'}, [verdict]),
      el('td', {'class': s.in_sample ? 'insample' : 'muted', text: s.scored_by_text || s.scored_by || ''}),
      el('td', {text: s.n_tiles === null ? '–' : String(s.n_tiles)}),
    ]);
    return tr;
  }

  function render() {
    writeHash();
    var viewable = data.slides.filter(function (s) { return s.status === 'ok'; });
    var other = data.slides.filter(function (s) { return s.status !== 'ok'; });
    var rows = sorted(viewable).filter(shown);
    try { sessionStorage.setItem('wsiOrder', JSON.stringify(rows.map(function (s) { return s.slide_id; }))); } catch (e) { /* private mode */ }
    var tbody = document.getElementById('rows');
    tbody.innerHTML = '';
    rows.forEach(function (s) { tbody.appendChild(row(s)); });
    document.getElementById('count').textContent = rows.length + ' of ' + viewable.length + ' viewable slides shown';
    Array.prototype.forEach.call(document.querySelectorAll('th.sortable'), function (th) {
      var arrow = th.querySelector('.arrow');
      arrow.textContent = th.dataset.key === st.sort ? (st.dir === 'asc' ? ' ▲' : ' ▼') : '';
    });
    var ob = document.getElementById('other');
    ob.innerHTML = '';
    if (other.length) {
      ob.appendChild(el('h2', {text: 'Not viewable (' + other.length + ')'}));
      var t = el('table', {id: 'not-viewable'}, [el('tr', {}, [el('th', {text: 'slide'}), el('th', {text: 'file'}),
        el('th', {text: 'status'}), el('th', {text: 'reason'})])]);
      other.forEach(function (s) {
        t.appendChild(el('tr', {'data-id': s.slide_id, 'data-status': s.status}, [
          el('td', {}, [el('a', {href: '/slide/' + enc(s.slide_id), text: s.slide_id})]), el('td', {text: s.file}),
          el('td', {'class': 'bad', text: s.status}), el('td', {text: s.reason})]));
      });
      ob.appendChild(t);
    }
    document.body.dataset.ready = '1';
  }

  function controls() {
    var labels = {}, preds = {};
    data.slides.forEach(function (s) { labels[s.label || 'unknown'] = 1; if (s.predicted_class) { preds[s.predicted_class] = 1; } });
    function select(id, values, key) {
      var sel = el('select', {id: id}, [el('option', {value: '', text: 'all'})]);
      Object.keys(values).sort().forEach(function (v) { sel.appendChild(el('option', {value: v, text: v})); });
      sel.value = st[key];
      sel.addEventListener('change', function () { st[key] = sel.value; render(); });
      return sel;
    }
    var q = el('input', {type: 'search', id: 'q', placeholder: 'slide id', value: st.q});
    q.addEventListener('input', function () { st.q = q.value; render(); });
    var wrong = el('input', {type: 'checkbox', id: 'wrong'});
    wrong.checked = st.wrong;
    wrong.addEventListener('change', function () { st.wrong = wrong.checked; render(); });
    var first = el('button', {id: 'wrong-first', text: 'misclassified first', onclick: function () {
      st.sort = 'wrongfirst'; st.dir = 'asc'; render();
    }});
    return el('div', {'class': 'controls'}, [
      el('label', {}, ['find ', q]), el('label', {}, ['true label ', select('f-label', labels, 'label')]),
      el('label', {}, ['prediction ', select('f-pred', preds, 'pred')]), first,
      el('label', {}, [wrong, ' misclassified only']), el('span', {id: 'count', 'class': 'muted'}),
    ]);
  }

  function start() {
    readHash();
    var nWrong = data.slides.filter(function (s) { return s.correct === false; }).length;
    var nView = data.slides.filter(function (s) { return s.status === 'ok'; }).length;
    var pTitle = data.positive_class ? 'P(' + data.positive_class + ')' : 'P(predicted)';
    columns[3].title = pTitle;
    document.body.className = 'cohort';
    var head = el('tr', {}, [el('th', {text: ''})].concat(columns.map(function (c) {
      var th = el('th', {'class': 'sortable', 'data-key': c.key, title: 'sort'}, [c.title, el('span', {'class': 'arrow'})]);
      th.addEventListener('click', function () {
        st.dir = st.sort === c.key && st.dir === 'desc' ? 'asc' : 'desc';
        st.sort = c.key;
        render();
      });
      return th;
    })));
    app.appendChild(el('header', {}, [
      el('h1', {text: 'wsi-mil view: ' + data.slides.length + ' slides'}),
      el('div', {'class': 'muted'}, [nView + ' viewable · ' + nWrong + ' misclassified among labelled slides · probability: ' +
        pTitle + ' of the slide · click a slide to open it (keys n/p step through this list) ',
        data.review ? el('a', {href: '/review/index.html', text: 'static review page'}) : null]),
      controls(),
    ]));
    app.appendChild(el('main', {}, [el('table', {id: 'slides'}, [el('thead', {}, [head]), el('tbody', {id: 'rows'})]),
      el('div', {id: 'other'})]));
    render();
  }

  fetch('/api/slides').then(function (r) { return r.json(); }).then(function (d) { data = d; start(); })
    .catch(function (err) { app.textContent = 'Could not load the cohort: ' + err.message; document.body.dataset.ready = 'error'; });
})();
