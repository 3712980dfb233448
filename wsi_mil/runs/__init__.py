"""Runs: the body of each batch command over a cohort, writing one output folder.

A run composes the library stages (``slide`` -> ``tissue`` -> ``tiling`` -> ``features`` -> ``mil`` ->
``heatmap``) with the store (atomic files, per-slide claims and records, the manifest), writes its
resolved config next to its outputs and can be resumed by running it again.

* :mod:`~wsi_mil.runs.slide_loop` - slide discovery, shards, the per-slide loop with records;
* :mod:`~wsi_mil.runs.tiles`, :mod:`~wsi_mil.runs.extract`, :mod:`~wsi_mil.runs.train`,
  :mod:`~wsi_mil.runs.predict`, :mod:`~wsi_mil.runs.heatmap` - one per command;
* :mod:`~wsi_mil.runs.pipeline` - all of them in a row from one YAML file.

Import the modules directly; this package imports nothing.
"""
