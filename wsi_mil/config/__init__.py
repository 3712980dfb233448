"""One validated configuration per command (unknown keys rejected), written next to its outputs.

* :mod:`~wsi_mil.config.base` - ``StrictModel``, YAML loading, merging, hashing, writing;
* :mod:`~wsi_mil.config.extract` - ``TilesConfig``, ``ExtractConfig`` and their parts;
* :mod:`~wsi_mil.config.train` - ``TrainConfig``, ``PredictConfig``;
* :mod:`~wsi_mil.config.heatmap` - ``HeatmapConfig``;
* the pipeline's config lives with the pipeline (:mod:`wsi_mil.runs.pipeline`).
"""

from __future__ import annotations

from wsi_mil.config.base import (
    StrictModel,
    config_hash,
    dump_config,
    load_config,
    read_yaml,
    validate_config,
    write_config,
)
from wsi_mil.config.extract import (
    EXTRACT_HASH_FIELDS,
    ExtractConfig,
    ExtractTilingConfig,
    PreprocessingConfig,
    SlideConfig,
    TilesConfig,
    TilingConfig,
    TissueConfig,
    extract_config_hash,
    extract_hash_fields,
)

__all__ = [
    "EXTRACT_HASH_FIELDS",
    "ExtractConfig",
    "ExtractTilingConfig",
    "PreprocessingConfig",
    "SlideConfig",
    "StrictModel",
    "TilesConfig",
    "TilingConfig",
    "TissueConfig",
    "config_hash",
    "dump_config",
    "extract_config_hash",
    "extract_hash_fields",
    "load_config",
    "read_yaml",
    "validate_config",
    "write_config",
]
