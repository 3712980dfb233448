"""``benchmarks/clam_compare.py`` without timing anything: its arguments, its dry run, the run without a CLAM
checkout, the wrapper that runs CLAM's scripts with random weights offline, and the figures it computes
from small records and logs written here (the real comparison takes minutes: see the README)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import _extract_profile  # noqa: E402
import clam_compare  # noqa: E402


def _fake_clam(folder: Path) -> Path:
    """A folder shaped like a CLAM checkout: its two scripts (tiny stand-ins) and a ``models`` package."""
    (folder / "models").mkdir(parents=True)
    (folder / "models" / "__init__.py").write_text(
        "import timm\n\n"
        "def get_encoder(model_name, target_img_size=224):\n"
        "    # as CLAM's TimmCNNEncoder asks: hub weights, which cannot download offline\n"
        "    return timm.create_model('resnet18', pretrained=True, num_classes=0), None\n"
    )
    (folder / "extract_features_fp.py").write_text(
        "import sys\n"
        "from models import get_encoder\n\n"
        "if __name__ == '__main__':\n"
        "    model, _ = get_encoder('resnet50_trunc')\n"
        "    print('args', sys.argv[1:], 'parameters', sum(p.numel() for p in model.parameters()))\n"
    )
    (folder / "create_patches_fp.py").write_text("print('segmentation took 0.5 seconds')\n")
    return folder


def test_arguments_are_checked_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        clam_compare._parse(["--clam", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "not a CLAM checkout" in err and "create_patches_fp.py" in err and "git clone" in err
    for bad in (["--rounds", "0"], ["--batch-size", "0"], ["--tissue-share", "0.9"], ["--tissue-share", "0.05"]):
        with pytest.raises(SystemExit):
            clam_compare._parse(bad)
    args = clam_compare._parse([])
    assert args.clam is None and args.rounds == 2 and args.batch_size == 8 and args.clam_batch_size == 256
    assert args.out == ROOT / "benchmarks" / "results" / "clam_compare.txt"


def test_dry_run_without_clam_plans_wsi_mil_only_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clam_compare.main(["--dry-run", "--work", str(tmp_path / "work"), "--slide-dir", str(tmp_path / "slide"),
                       "--out", str(tmp_path / "out.txt"), "--tissue-share", "0.15"])  # fmt: skip
    out = capsys.readouterr().out
    assert "CLAM: not given (--clam DIR): skipped, wsi-mil only" in out
    wsimil = next(line for line in out.splitlines() if line.startswith("wsi-mil (batch 8"))
    assert "-m wsi_mil -q extract" in wsimil and "--encoder resnet50_trunc --random-init --batch-size 8" in wsimil
    assert "built on the first run" in out and "15% under tissue" in out and "tissue_15" in out
    assert not any(tmp_path.iterdir())  # no slide, no work folder, no result file


def test_dry_run_with_a_clam_checkout_lists_clams_own_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clam = _fake_clam(tmp_path / "CLAM")
    clam_compare.main(["--dry-run", "--clam", str(clam), "--work", str(tmp_path / "work"), "--profile",
                       "--clam-encoder-alone", "--out", str(tmp_path / "out.txt")])  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    patch, features = (line for line in lines if line.startswith("CLAM (batch 256"))
    assert "_clam_run.py" in patch and "create_patches_fp.py" in patch and "--patch_size 256 --seg --patch" in patch
    assert "--stitch" not in patch
    assert "extract_features_fp.py" in features and "--batch_size 256" in features and "--model_name resnet50_trunc" in features
    assert "process_list_autogen.csv" in features
    assert any("CLAM, wsi-mil, CLAM with THP_MEM_ALLOC_ENABLE=1" in line for line in lines)
    assert any("encoder alone at CLAM's settings" in line for line in lines)
    assert any("profiled wsi-mil run" in line for line in lines)
    assert not (tmp_path / "work").exists() and not (tmp_path / "out.txt").exists()


def test_environments_give_clam_the_huge_pages_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")  # a setting of the caller's shell must not leak into a run
    args = clam_compare._parse(["--threads", "3"])
    default, thp, wsimil = (clam_compare._env(args, False, False), clam_compare._env(args, True, False),
                            clam_compare._env(args, None, True))  # fmt: skip
    assert default["THP_MEM_ALLOC_ENABLE"] == "0" and thp["THP_MEM_ALLOC_ENABLE"] == "1"
    assert "THP_MEM_ALLOC_ENABLE" not in wsimil  # left to wsi-mil's CLI, which sets 1
    assert {e["OMP_NUM_THREADS"] for e in (default, thp, wsimil)} == {"3"} and default["HF_HUB_OFFLINE"] == "1"
    assert wsimil["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT) and "PYTHONPATH" not in default


def test_the_wrapper_runs_a_clam_script_with_random_weights_offline(tmp_path: Path) -> None:
    clam = _fake_clam(tmp_path / "CLAM")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "_clam_run.py"), str(clam), "extract_features_fp.py",
                        "--batch_size", "256"], capture_output=True, text=True, env=env, cwd=tmp_path, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "args ['--batch_size', '256'] parameters" in r.stdout
    marks = json.loads(next(ln for ln in r.stderr.splitlines() if ln.startswith("CLAM_MARKS ")).split(" ", 1)[1])
    assert marks["random_init"] is True
    assert marks["wrapper_start"] <= marks["encoder_start"] <= marks["encoder_end"] <= marks["script_end"]


def test_clams_log_gives_its_timers_and_a_missing_one_is_noticed() -> None:
    log = ("processing clam_compare_slide.svs\nsegmentation took 0.15 seconds\npatching took 0.35 seconds\n"
           "stitching took -1 seconds\naverage segmentation time in s per slide: 0.15\n"
           "computing features for /w/features/h5_files/clam_compare_slide.h5 took 97.5 s\n")  # fmt: skip
    assert clam_compare.parse_clam_log(log) == {"seg_s": 0.15, "patch_s": 0.35, "features_s": 97.5}
    assert "features_s" not in clam_compare.parse_clam_log(log.replace("computing features", "skipped"))


def test_wsi_mil_figures_come_from_its_run_json_and_manifest(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text(json.dumps({"precision": "bf16", "loader": "thread", "torch_threads": 2,
                                                   "totals": {"tiles": 700, "seconds": 16.0}}))  # fmt: skip
    row = {"slide_id": "clam_compare_slide", "status": "done", "n_tiles": 700, "seconds": 16.0, "prepare_s": 2.0,
           "read_s": 0.5, "model_s": 13.0}  # fmt: skip
    with open(tmp_path / "manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(row))
        w.writeheader()
        w.writerow(row)
    fig = clam_compare.wsimil_figures(tmp_path, wall_s=20.0)
    assert fig["tiles"] == 700 and fig["startup_s"] == pytest.approx(4.0) and fig["encode_s"] == pytest.approx(14.0)
    assert fig["in_slide_tiles_per_s"] == pytest.approx(50.0) and fig["wall_tiles_per_s"] == pytest.approx(35.0)


def test_report_states_the_ratios_of_the_medians() -> None:
    args = clam_compare._parse([])
    wm = [{"wall_s": w, "tiles": 700, "wall_tiles_per_s": 700 / w, "in_slide_tiles_per_s": 45.0, "startup_s": 4.0,
           "prepare_s": 1.0, "read_s": 0.5, "model_s": 14.0, "precision": "bf16"} for w in (20.0, 20.0, 30.0)]  # fmt: skip
    clam = {"default allocator": [{"wall_s": 100.0, "tiles": 875, "wall_tiles_per_s": 8.75, "in_slide_tiles_per_s": 10.0,
                                   "outside_timers_s": 10.0, "seg_s": 0.2, "patch_s": 0.3, "features_s": 87.5,
                                   "until_model_s": 4.0, "model_build_s": 0.5}], "THP": []}  # fmt: skip
    text = "\n".join(clam_compare.report(args, wm, clam, [50.0, 40.0, 60.0], enc_clam=12.5))
    assert "wsi-mil vs CLAM (default allocator): 4.00x the tiles/s, 5.00x less wall time" in text
    assert "vs CLAM (THP)" not in text  # no run: no ratio
    assert "wsi-mil (bf16, batch 8, THP)" in text and "45.0 / 50.0 = 0.900" in text and "4.0 s = 20% of the wall time" in text
    assert "CLAM feature loop / encoder alone" in text and ": 0.800;" in text and "about 18 s of its 88 s feature loop" in text


def test_profile_summary_splits_the_encode_phase_and_sorts_ops_into_kinds() -> None:
    info = {
        "clock_s": {"transform": 1.0, "forward": 8.0, "write": 0.5, "read_tiles": 4.0, "read_region": 3.5, "decode": 3.0},
        "calls": {"read_tiles": 22},
        "batch_wall_s": 12.0, "process_cpu_s": 22.0, "main_cpu_s": 10.0, "other_live_threads_cpu_s": 8.0, "reader_cpu_s": 3.0,
        "ops": {"wsi:transform": {"aten::_upsample_bilinear2d_aa": 0.6, "aten::copy_": 0.3},
                "wsi:forward": {"aten::mkldnn_convolution": 7.0, "aten::native_batch_norm": 0.5, "aten::relu_": 0.3},
                "other": {"aten::cat": 0.1}},
    }  # fmt: skip
    record = {"n_tiles": "700", "seconds": "12.0", "prepare_s": "1.0", "read_s": "0.5", "model_s": "9.5"}
    text = "\n".join(_extract_profile.summarise(info, record, wall_s=15.0))
    assert "700 tiles, encode phase 11.0 s = 63.6 tiles/s" in text
    assert "model forward" in text and "  8.00 s   72.7 %" in text
    assert "after the forward: .float(), cat, .numpy()" in text and "  0.50 s" in text  # 9.5 - 1.0 - 8.0
    assert "22 reads of up to 32 tiles = decode 3.00 + composite on white 0.50 + rows to tiles 0.50" in text
    assert "reading thread 3.0, rest 1.0; in all 22.0" in text
    assert "transform  self CPU s: resize 0.60, casts and copies 0.30" in text
    assert "forward    self CPU s: convolution 7.00, batch norm 0.50, elementwise 0.30" in text
