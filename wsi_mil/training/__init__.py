"""Cross-validated MIL training on feature bags (``wsi-mil train``) and inference (``wsi-mil predict``).

Modules (import them directly; this package imports nothing heavy):

* :mod:`~wsi_mil.training.config` — ``TrainConfig`` / ``PredictConfig`` (validated, unknown keys rejected);
* :mod:`~wsi_mil.training.labels` — the label table (ids are strings, clear errors naming rows);
* :mod:`~wsi_mil.training.datasets` — feature folders of wsi-mil, CLAM and TRIDENT; lazy bag datasets;
* :mod:`~wsi_mil.training.splits` — case-grouped, label-stratified k-fold splits and their validation;
* :mod:`~wsi_mil.training.metrics` — AUC, accuracy, balanced accuracy, macro F1 with bootstrap CIs;
* :mod:`~wsi_mil.training.checkpoint` — safetensors weights + a JSON sidecar with the feature spec;
* :mod:`~wsi_mil.training.run` — :func:`run_train`; :mod:`~wsi_mil.training.predict` — :func:`run_predict`.
"""

from __future__ import annotations
