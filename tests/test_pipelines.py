"""Job specs in pipelines/: Kubernetes YAML parsed and checked, Slurm scripts syntax-checked and submitted
against a stub ``sbatch`` (array size = shard count, afterok chain)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from wsi_mil.cli import main
from wsi_mil.runs.slide_loop import parse_shard

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "pipelines" / "k8s"
SLURM = ROOT / "pipelines" / "slurm"


def _k8s_docs() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d)
    return docs


def _containers(job: dict[str, Any]) -> list[dict[str, Any]]:
    spec = job["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def test_every_k8s_yaml_parses_into_jobs_using_the_wsi_mil_entrypoint() -> None:
    docs = _k8s_docs()
    assert {d["metadata"]["name"] for d in docs} >= {"wsi-mil-extract", "wsi-mil-train", "wsi-mil-heatmap"}
    used: set[str] = set()
    for job in docs:
        assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
        spec = job["spec"]["template"]["spec"]
        assert spec["restartPolicy"] == "Never" and spec["securityContext"]["runAsNonRoot"] is True
        for c in _containers(job):
            assert "wsi-mil" in c["image"] and "command" not in c  # the image's ENTRYPOINT is wsi-mil
            sub = c["args"][0]
            assert sub in main.commands, f"{job['metadata']['name']}: unknown subcommand {sub}"
            used.add(sub)
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert env.get("HDF5_USE_FILE_LOCKING") == "FALSE"
        mounts = {m["name"]: m for c in _containers(job) for m in c.get("volumeMounts", [])}
        if "slides" in mounts:
            assert mounts["slides"]["readOnly"] is True
    assert used >= {"extract", "train", "predict", "heatmap"}


def test_indexed_extract_job_shards_match_completions_and_have_gpus() -> None:
    (job,) = [d for d in _k8s_docs() if d["spec"].get("completionMode") == "Indexed"]
    spec = job["spec"]
    (c,) = _containers(job)
    assert c["args"][0] == "extract"
    env = {e["name"]: e.get("value") for e in c["env"]}
    shards = int(env["WSI_MIL_SHARDS"])
    assert spec["completions"] == shards and 1 <= spec["parallelism"] <= shards
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == 1
    # each index becomes one distinct shard, together covering all of them
    shards_seen = {parse_shard(None, {"JOB_COMPLETION_INDEX": str(i), "WSI_MIL_SHARDS": env["WSI_MIL_SHARDS"]}) for i in range(shards)}
    assert shards_seen == {(i, shards) for i in range(shards)}
    assert "--allow-failed-slides" in c["args"] and "--out" in c["args"]


def test_train_job_uses_gpu_limits() -> None:
    (job,) = [d for d in _k8s_docs() if d["metadata"]["name"] == "wsi-mil-train"]
    for c in _containers(job):
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == 1


@pytest.mark.parametrize("script", sorted(p.name for p in SLURM.iterdir() if p.suffix in (".sh", ".sbatch")))
def test_slurm_scripts_are_valid_bash(script: str) -> None:
    res = subprocess.run(["bash", "-n", str(SLURM / script)], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr


def _sbatch_value(text: str, key: str) -> str | None:
    m = re.search(rf"^#SBATCH --{key}[= ](\S+)", text, re.M)
    return m.group(1) if m else None


def test_slurm_array_size_matches_the_shard_count() -> None:
    config = (SLURM / "config.sh").read_text()
    shards = int(re.search(r"^SHARDS=(\d+)", config, re.M).group(1))  # type: ignore[union-attr]
    extract = (SLURM / "extract.sbatch").read_text()
    assert _sbatch_value(extract, "array") == f"0-{shards - 1}"
    assert _sbatch_value(extract, "gres") == "gpu:1"
    assert 'WSI_MIL_SHARDS="${WSI_MIL_SHARDS:-$SHARDS}"' in extract
    assert _sbatch_value((SLURM / "train.sbatch").read_text(), "gres") == "gpu:1"


def test_submit_chains_array_train_heatmap_with_afterok(tmp_path: Path) -> None:
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "sbatch.log"
    stub = bin_dir / "sbatch"
    stub.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$*" >> {log}\n'
        f'n=$(wc -l < {log}); echo "$((1000 + n));cluster"\n'
    )
    stub.chmod(0o755)
    config = tmp_path / "my.sh"
    text = (SLURM / "config.sh").read_text()
    text = re.sub(r"^SHARDS=\d+", "SHARDS=5", text, flags=re.M)
    text = re.sub(r"^OUT=\S+", f"OUT={tmp_path / 'out'}", text, flags=re.M)
    config.write_text(text)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "USER": "u"}
    res = subprocess.run(["bash", str(SLURM / "submit.sh"), str(config)], capture_output=True, text=True, env=env, check=False)
    assert res.returncode == 0, res.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == 3
    assert "--array=0-4" in calls[0] and "WSI_MIL_SHARDS=5" in calls[0] and calls[0].endswith("extract.sbatch")
    assert "--dependency=afterok:1001" in calls[1] and calls[1].endswith("train.sbatch")
    assert "--dependency=afterok:1002" in calls[2] and calls[2].endswith("heatmap.sbatch")
    assert "extract 1001 (array 0-4), train 1002, heatmap 1003" in res.stdout


def test_slurm_extract_task_runs_its_shard(tmp_path: Path) -> None:
    """extract.sbatch run as array task 2 of 3 calls wsi-mil extract with that shard in its environment."""
    fake = tmp_path / "wsi-mil"
    fake.write_text('#!/usr/bin/env bash\necho "args=$* shards=$WSI_MIL_SHARDS task=$SLURM_ARRAY_TASK_ID locking=$HDF5_USE_FILE_LOCKING"\n')
    fake.chmod(0o755)
    config = tmp_path / "c.sh"
    config.write_text(f"SLIDES=/s\nLABELS=/l.csv\nOUT=/o\nSHARDS=3\nWSI_MIL={fake}\nEXTRACT_ARGS='--device cuda'\n")
    env = {**os.environ, "WSI_MIL_CONFIG": str(config), "SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3"}
    env.pop("WSI_MIL_SHARDS", None)
    res = subprocess.run(["bash", str(SLURM / "extract.sbatch")], capture_output=True, text=True, env=env, check=False)
    assert res.returncode == 0, res.stderr
    assert "args=extract /s --out /o/extract --allow-failed-slides --device cuda shards=3 task=2 locking=FALSE" in res.stdout


def test_allow_failed_slides_exits_zero_on_slide_failures_only(tmp_path: Path) -> None:
    from click.testing import CliRunner

    empty = tmp_path / "in" / "zero.svs"
    empty.parent.mkdir()
    empty.write_bytes(b"")
    runner = CliRunner()
    args = ["-q", "extract", str(empty), "--device", "cpu", "--random-init", "--encoder", "resnet18"]
    res = runner.invoke(main, [*args, "--out", str(tmp_path / "a")])
    assert res.exit_code == 1, res.output
    res = runner.invoke(main, [*args, "--out", str(tmp_path / "b"), "--allow-failed-slides"])
    assert res.exit_code == 0, res.output
    assert "failed,SlideOpenError" in (tmp_path / "b" / "manifest.csv").read_text()
