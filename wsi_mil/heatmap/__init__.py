"""Heatmaps over slide thumbnails, top tiles and a review page: the library behind ``wsi-mil heatmap``.

Light on import: matplotlib, h5py and the slide readers load only when a function needs them.

* :mod:`wsi_mil.heatmap.render` - canvas, colours, figure;
* :mod:`wsi_mil.heatmap.export` - top/bottom tile crops and contact sheets;
* :mod:`wsi_mil.heatmap.review` - the review page ``index.html``.

The batch function behind the command is :func:`wsi_mil.runs.heatmap.run_heatmap`; the files it reads
and writes are defined in :mod:`wsi_mil.store` (``score_file``, ``heatmap_file``, ``geojson``).
"""
