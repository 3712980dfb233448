"""A labelled cohort of feature bags: labels, case-grouped splits, bag loading and metrics.

* :mod:`~wsi_mil.cohort.labels` - the label table (ids are strings, clear errors naming rows);
* :mod:`~wsi_mil.cohort.datasets` - feature folders of wsi-mil, CLAM and TRIDENT; lazy bag datasets;
* :mod:`~wsi_mil.cohort.splits` - case-grouped, label-stratified k-fold splits and their validation;
* :mod:`~wsi_mil.cohort.metrics` - AUC, accuracy, balanced accuracy, macro F1 with bootstrap CIs.

Import the modules directly; this package imports nothing heavy.
"""
