"""``wsi-mil pipeline``: one config runs a cohort through extract -> train -> predict -> heatmap.

The cohort is the built-in sample cohort (``sample_data``) or the user's slides and label CSV. Each
stage calls the same library function as its own command (:func:`~wsi_mil.runs.devices.extract_on_devices`,
:func:`~wsi_mil.runs.train.run_train`, :func:`~wsi_mil.runs.predict.run_predict`,
:func:`~wsi_mil.runs.heatmap.run_heatmap`) with the stage's section of the config, which takes exactly
the keys of ``configs/<stage>.yaml``. Layout of ``out``: ``cohort/`` (sample data only), ``extract/``,
``train/``, ``predict/``, ``heatmaps/`` (``index.html``), ``pipeline.yaml`` (the resolved config).

Rerunning the same config resumes: extraction skips complete slides; training, prediction and heatmaps
are redone (they take minutes, not hours). A slide that fails extraction is explained in
``extract/manifest.csv`` and left out of the later stages; the run then ends with exit code 1.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from wsi_mil.config import ExtractConfig, StrictModel, write_config
from wsi_mil.config.heatmap import HeatmapConfig
from wsi_mil.config.train import PredictConfig, TrainConfig
from wsi_mil.errors import ConfigError, InputError

logger = logging.getLogger(__name__)

STAGES = ("extract", "train", "predict", "heatmap")


class SampleDataConfig(StrictModel):
    """The built-in sample cohort (``wsi-mil sample-data``), written into ``OUT/cohort``."""

    slides: int = Field(12, ge=4, le=500, description="slides, half tumor and half normal")
    seed: int = 0
    lesion_share: float | None = Field(None, ge=0.003, le=0.5, description="lesion share of the tissue; null: drawn per slide")
    lesions_per_slide: int | None = Field(None, ge=1, le=8, description="null: 1 to 3 drawn per slide")
    lesion_kind: Literal["ihc", "he"] = Field("ihc", description="ihc: brown IHC lesions; he: H&E of another kind")


class PipelineConfig(StrictModel):
    """``wsi-mil pipeline``: the cohort, the output folder and one section per stage."""

    out: str = "wsi_mil_pipeline"
    sample_data: SampleDataConfig | None = SampleDataConfig()
    slides: list[str] | None = Field(None, description="folders, globs, files or a CSV with a 'path' column")
    labels: str | None = Field(None, description="label CSV (slide_id, label, optional case_id)")
    extract: ExtractConfig = ExtractConfig()
    train: TrainConfig = TrainConfig()
    predict: PredictConfig = PredictConfig()
    heatmap: HeatmapConfig = HeatmapConfig()

    @model_validator(mode="after")
    def _one_cohort(self) -> PipelineConfig:
        if self.sample_data is not None and (self.slides or self.labels):
            raise ValueError("give either sample_data, or slides and labels (set sample_data: null)")
        if self.sample_data is None and not (self.slides and self.labels):
            raise ValueError("without sample_data, both slides and labels are required")
        return self


@dataclass
class PipelineResult:
    """What :func:`run_pipeline` produced; everything is also on disk under ``out``."""

    out: Path
    slides_dir: str
    labels_csv: Path
    extract_text: str
    extract_counts: dict[str, int]
    train_table: str
    predict_table: str
    heatmap_text: str
    metrics_json: Path
    heatmap_dir: Path
    index_html: Path | None
    heatmap_pngs: list[Path] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    exit_code: int = 0

    def text(self) -> str:
        """A plain-text report: each stage's result, the cross-validated metrics, where the outputs are."""
        times = ", ".join(f"{k} {v:.0f} s" for k, v in self.stage_seconds.items())
        lines = [
            f"== extract ({self.slides_dir})",
            self.extract_text,
            "== train: cross-validated, out-of-fold metrics of slides and of cases with 95% bootstrap CIs",
            self.train_table,
            "== predict: out of fold (each slide scored by the fold model that held it out)",
            self.predict_table,
            "== heatmap",
            self.heatmap_text,
            "== outputs",
            f"metrics:      {self.metrics_json}",
            f"predictions:  {self.out / 'train' / 'predictions.csv'} (out of fold), {self.out / 'predict' / 'predictions.csv'}",
            f"heatmaps:     {self.heatmap_dir}/<slide_id>/heatmap.png ({len(self.heatmap_pngs)} slides)",
        ]
        if self.heatmap_pngs:
            lines.append(f"   e.g.       {self.heatmap_pngs[0]}")
        lines.append(f"review page:  {self.index_html if self.index_html else '(none: no slide rendered)'}")
        lines.append(f"zoom in:      wsi-mil view {self.out}   (a local viewer with the model's evidence on the slides)")
        lines.append(f"manifests:    {self.out / 'extract' / 'manifest.csv'}, {self.heatmap_dir / 'manifest.csv'}")
        lines.append(f"time:         {times}")
        return "\n".join(lines)


def load_pipeline_config(
    path: str | Path | None = None,
    *,
    out: str | None = None,
    slides: list[str] | None = None,
    labels: str | None = None,
    device: str | None = None,
) -> PipelineConfig:
    """The validated pipeline config: ``path`` (YAML, or the defaults) with command-line overrides.

    ``slides`` replaces the sample cohort by the user's slides; ``device`` applies to every stage.
    Unknown keys in any section are rejected, naming the key.
    """
    from wsi_mil.config import read_yaml, validate_config

    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    if out is not None:
        data["out"] = out
    if slides:
        data["slides"] = list(slides)
        data["sample_data"] = None
    if labels is not None:
        data["labels"] = labels
    if device is not None:
        for section, key in (("extract", None), ("train", "training"), ("predict", None)):
            node = data.setdefault(section, {})
            if not isinstance(node, dict):
                raise ConfigError(f"'{section}' in {path} must be a mapping of the keys of configs/{section}.yaml.")
            if key is not None:
                node = node.setdefault(key, {})
            node["device"] = device
    return validate_config(PipelineConfig, data, path)


def run_pipeline(cfg: PipelineConfig, *, progress: bool | None = None) -> PipelineResult:
    """Run every stage; raise :class:`~wsi_mil.errors.InputError` when a stage leaves nothing to go on."""
    from wsi_mil.runs.devices import extract_on_devices
    from wsi_mil.runs.heatmap import run_heatmap
    from wsi_mil.runs.predict import run_predict
    from wsi_mil.runs.slide_loop import discover_slides
    from wsi_mil.runs.train import run_train
    from wsi_mil.store import atomic_write_json, ensure_writable_dir

    out = ensure_writable_dir(Path(cfg.out))
    write_config(cfg, out / "pipeline.yaml")
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    if cfg.sample_data is not None:
        from wsi_mil.demo.cohort import build_sample_cohort

        sd = cfg.sample_data
        info = build_sample_cohort(
            out / "cohort", n_slides=sd.slides, seed=sd.seed, lesion_share=sd.lesion_share,
            lesions_per_slide=sd.lesions_per_slide, lesion_kind=sd.lesion_kind,
        )
        slide_inputs: list[str] = [str(info.slides_dir)]
        labels_csv = info.labels_csv
        seconds["sample-data"] = time.perf_counter() - t0
    else:
        assert cfg.slides is not None and cfg.labels is not None  # the validator guarantees it
        slide_inputs = list(cfg.slides)
        labels_csv = Path(cfg.labels)
        if not labels_csv.is_file():
            raise ConfigError(f"labels: {labels_csv} does not exist; give the label CSV of the cohort.")
    slides = discover_slides(slide_inputs)
    logger.info("pipeline: %d slide(s) -> %s", len(slides), out)

    t0 = time.perf_counter()
    summary = extract_on_devices(slides, out / "extract", cfg.extract, progress=progress)
    seconds["extract"] = time.perf_counter() - t0
    if summary.interrupted:
        raise KeyboardInterrupt
    counts = dict(summary.counts)
    if not counts.get("done") and not counts.get("skipped"):
        raise InputError(
            f"No slide was extracted ({summary.text()}); see {out / 'extract' / 'manifest.csv'} for each slide's error."
        )

    t0 = time.perf_counter()
    features = out / "extract" / "features"
    trained = run_train(features, labels_csv, out / "train", cfg.train, overwrite=True, progress=progress)
    seconds["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    predicted = run_predict(features, [out / "train"], out / "predict", cfg.predict, labels_csv=labels_csv, progress=progress)
    seconds["predict"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    done_ids = {r["slide_id"] for r in summary.records if r.get("status") in ("done", "skipped")}
    rendered = run_heatmap([p for p in slides if p.stem in done_ids], out / "predict", out / "heatmaps", cfg.heatmap, progress=progress)
    seconds["heatmap"] = time.perf_counter() - t0

    pngs = sorted((out / "heatmaps").glob("*/heatmap.png"))
    exit_code = max(summary.exit_code, predicted.exit_code, rendered.exit_code)
    result = PipelineResult(
        out=out,
        slides_dir=", ".join(slide_inputs),
        labels_csv=labels_csv,
        extract_text=summary.text(),
        extract_counts=counts,
        train_table=trained.table(),
        predict_table=predicted.table(),
        heatmap_text=rendered.text(),
        metrics_json=trained.out_dir / "metrics.json",
        heatmap_dir=out / "heatmaps",
        index_html=rendered.index_html,
        heatmap_pngs=pngs,
        stage_seconds={k: round(v, 1) for k, v in seconds.items()},
        exit_code=exit_code,
    )
    atomic_write_json(
        out / "pipeline.json",
        json.loads(
            json.dumps(
                {
                    "stage_seconds": result.stage_seconds,
                    "extract": counts,
                    "pooled_out_of_fold": trained.metrics.get("pooled_out_of_fold"),
                    "pooled_out_of_fold_cases": trained.metrics.get("pooled_out_of_fold_cases"),
                    "metrics_json": str(result.metrics_json),
                    "index_html": str(result.index_html) if result.index_html else None,
                    "exit_code": exit_code,
                },
                default=str,
            )
        ),
    )
    return result
