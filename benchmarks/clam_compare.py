"""One slide on the CPU, ``wsi-mil extract`` side by side with CLAM (issue 19): wall time, tiles/s, start-up.

The slide: 20,480 x 16,384 px Aperio-style ``.svs`` of real H&E, JPEG tiles, 0.5 µm/px, AppMag 20, with
``--tissue-share`` of it tissue (default 0.5: about 2,800 CLAM tiles; 0.15: about 800, near the issue's
681 / 867 tiles) and the rest glass (``_clam_slide.py``; built once per share into ``--slide-dir``, 30 s).
Both sides run the same network with random weights: ResNet-50 (timm ``resnet50.tv_in1k``) cut after
layer3 and average-pooled, 1024-d.

* wsi-mil: ``python -m wsi_mil -q extract SLIDE --encoder resnet50_trunc --random-init --batch-size 8`` at
  its CPU defaults (bf16 autocast where the CPU has avx512_bf16, channels_last, a reading thread,
  ``THP_MEM_ALLOC_ENABLE=1`` set by its CLI), from this checkout.
* CLAM: its own ``create_patches_fp.py --patch_size 256 --seg --patch`` (the README's 20x command, without
  the optional ``--stitch`` picture) then ``extract_features_fp.py --model_name resnet50_trunc`` at its
  defaults (``--batch_size 256``, ``--target_patch_size 224``, fp32, tiles read in the main process on a
  CPU), each run through ``_clam_run.py`` (random weights instead of the hub's; CLAM's code is imported
  from ``--clam``, never copied: it is GPL-3.0). Once with the default allocator, once with
  ``THP_MEM_ALLOC_ENABLE=1``, the huge-page setting wsi-mil uses.

Every run is a fresh process (CLAM: two), timed from start to end, interleaved over ``--rounds``: wsi-mil,
CLAM, wsi-mil, CLAM with huge pages, the encoder alone; all with ``OMP_NUM_THREADS=--threads`` and
``HF_HUB_OFFLINE=1``. From wsi-mil's own outputs (``run.json``, ``manifest.csv``): the in-slide rate
(tiles / the slide's encode phase: reading, model, writing; not tissue or grid) and the start-up (the
process's wall time less the batch phase: interpreter, imports, model, and exit). From CLAM's log: its
segmentation, patching and feature-loop times. The encoder alone (``extract.py``'s measurement: random
uint8 tiles through the transform and the model at wsi-mil's batch, precision, memory format, threads and
allocator) gives in-slide / encoder alone. ``--clam-encoder-alone`` also times the encoder at CLAM's
settings (fp32, batch 256, no channels_last, default allocator) once; ``--profile`` adds one wsi-mil run
with timers and torch.profiler (``_extract_profile.py``) that says where the in-slide time goes.

    python benchmarks/clam_compare.py --clam /path/to/CLAM                 # writes benchmarks/results/clam_compare.txt
    python benchmarks/clam_compare.py --clam /path/to/CLAM --rounds 3 --profile --clam-encoder-alone
    python benchmarks/clam_compare.py --clam /path/to/CLAM --tissue-share 0.15   # the issue's tile counts
    python benchmarks/clam_compare.py --dry-run                             # the plan; nothing runs
    python benchmarks/clam_compare.py                                       # no --clam: wsi-mil only

A CLAM checkout: ``git clone https://github.com/mahmoodlab/CLAM`` (or an export of it). Its scripts need
torch, torchvision, timm, openslide-python, h5py, opencv, pandas, matplotlib and tqdm: wsi-mil's
environment has them all; ``--clam-python`` runs CLAM with another interpreter.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CLAM_SCRIPTS = ("create_patches_fp.py", "extract_features_fp.py")
#: extract_features_fp.py's --batch_size default (its README's GPU example uses 512)
CLAM_BATCH = 256
SLIDE_ID = "clam_compare_slide"


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clam", type=Path, default=None, help="a CLAM checkout (with create_patches_fp.py); none: wsi-mil only")
    p.add_argument("--clam-python", default=sys.executable, help="the Python that runs CLAM (default: this one)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of every run (torch threads)")
    p.add_argument("--batch-size", type=int, default=8, help="wsi-mil's batch (8: its CPU default)")
    p.add_argument("--clam-batch-size", type=int, default=CLAM_BATCH, help="CLAM's --batch_size (256: its default)")
    p.add_argument("--encoder-tiles", type=int, default=384, help="timed tiles of the encoder alone")
    p.add_argument("--clam-encoder-alone", action="store_true", help="also time the encoder at CLAM's settings once")
    p.add_argument("--profile", action="store_true", help="one more wsi-mil run: where the in-slide time goes")
    p.add_argument("--slide-dir", type=Path, default=HERE / "results" / "clam_slide", help="the slide, built if missing")
    p.add_argument("--tissue-share", type=float, default=0.5,
                   help="share of the slide under tissue (0.5: about 2,800 CLAM tiles; 0.1: 547; 0.15: about 800, near the "
                        "issue's 867)")
    p.add_argument("--work", type=Path, default=Path("/tmp/wsi_mil_bench/clam_compare"))
    p.add_argument("--out", type=Path, default=HERE / "results" / "clam_compare.txt")
    p.add_argument("--note", default="", help="a line printed first (e.g. 'smoke run under load')")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the commands; run nothing")
    args = p.parse_args(argv)
    for name in ("rounds", "threads", "batch_size", "clam_batch_size", "encoder_tiles"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0.1 <= args.tissue_share <= 0.6:
        p.error("--tissue-share must be between 0.1 (below, CLAM's default a_t = 100 drops the one tissue piece) "
                "and 0.6 (above, the pieces touch)")  # fmt: skip
    if args.clam is not None:
        missing = [s for s in CLAM_SCRIPTS if not (args.clam / s).is_file()]
        if missing:
            p.error(f"--clam {args.clam} is not a CLAM checkout: no {', '.join(missing)} there "
                    "(git clone https://github.com/mahmoodlab/CLAM)")  # fmt: skip
    return args


# --- commands and environments ------------------------------------------------------------------------------
def _env(args: argparse.Namespace, huge_pages: bool | None, pythonpath: bool) -> dict[str, str]:
    """The environment of one run; ``huge_pages`` None: leave THP to the program (wsi-mil's CLI sets it)."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    if huge_pages is not None:
        env["THP_MEM_ALLOC_ENABLE"] = "1" if huge_pages else "0"
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    else:
        env.pop("PYTHONPATH", None)
    return env


def wsimil_cmd(args: argparse.Namespace, slide: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "wsi_mil", "-q", "extract", str(slide), "--out", str(out), "--encoder", "resnet50_trunc",
            "--random-init", "--batch-size", str(args.batch_size)]  # fmt: skip


def clam_cmds(args: argparse.Namespace, source: Path, out: Path) -> list[list[str]]:
    run = [args.clam_python, str(HERE / "_clam_run.py"), str(Path(args.clam).resolve())]
    return [
        [*run, "create_patches_fp.py", "--source", str(source), "--save_dir", str(out), "--patch_size", "256", "--seg", "--patch"],
        [*run, "extract_features_fp.py", "--data_h5_dir", str(out), "--data_slide_dir", str(source), "--csv_path",
         str(out / "process_list_autogen.csv"), "--feat_dir", str(out / "features"), "--batch_size",
         str(args.clam_batch_size), "--slide_ext", ".svs", "--model_name", "resnet50_trunc"],
    ]  # fmt: skip


def plan(args: argparse.Namespace) -> list[str]:
    """What a run does, in words and commands (``--dry-run`` prints it)."""
    slide = args.slide_dir / f"tissue_{round(100 * args.tissue_share):02d}" / f"{SLIDE_ID}.svs"
    lines = [
        f"slide: {slide} ({'present' if slide.is_file() else 'built on the first run'}), 20,480 x 16,384 px, "
        f"{args.tissue_share:.0%} under tissue; work folder {args.work}",
        f"rounds: {args.rounds}, each: wsi-mil, "
        + ("CLAM, wsi-mil, CLAM with THP_MEM_ALLOC_ENABLE=1, " if args.clam else "wsi-mil, ")
        + f"the encoder alone (batch {args.batch_size}, {args.encoder_tiles} tiles); OMP_NUM_THREADS={args.threads}",
        f"wsi-mil (batch {args.batch_size}, its CPU defaults; THP_MEM_ALLOC_ENABLE=1 from its CLI): "
        + " ".join(wsimil_cmd(args, args.work / "slides" / slide.name, args.work / "wsi_mil_out")),
    ]
    if args.clam:
        for cmd in clam_cmds(args, args.work / "slides", args.work / "clam_out"):
            lines.append(f"CLAM (batch {args.clam_batch_size}, fp32, tiles read in series; default allocator, then "
                         f"THP_MEM_ALLOC_ENABLE=1): " + " ".join(cmd))  # fmt: skip
        if args.clam_encoder_alone:
            lines.append(f"once: the encoder alone at CLAM's settings (fp32, batch {args.clam_batch_size}, default allocator)")
    else:
        lines.append("CLAM: not given (--clam DIR): skipped, wsi-mil only")
    if args.profile:
        lines.append("once: a profiled wsi-mil run (benchmarks/_extract_profile.py)")
    return lines


# --- runs ---------------------------------------------------------------------------------------------------
def _timed(cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> tuple[subprocess.CompletedProcess[str], float, float]:
    """Run ``cmd``; return it, its wall seconds and its start (``time.time()``)."""
    start = time.time()
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=3600, check=False)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return r, wall, start


def _fresh(folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    return folder


def wsimil_figures(out: Path, wall_s: float) -> dict[str, Any]:
    """One wsi-mil run's figures from its ``run.json`` and manifest row."""
    run = json.loads((out / "run.json").read_text())
    with open(out / "manifest.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    tiles = int(row["n_tiles"])
    encode_s = float(row["seconds"]) - float(row["prepare_s"])
    return {
        "wall_s": wall_s, "tiles": tiles, "wall_tiles_per_s": tiles / wall_s, "in_slide_tiles_per_s": tiles / encode_s,
        "encode_s": encode_s, "prepare_s": float(row["prepare_s"]), "read_s": float(row["read_s"]),
        "model_s": float(row["model_s"]), "startup_s": wall_s - float(run["totals"]["seconds"]),
        "precision": run["precision"], "loader": run["loader"], "torch_threads": run["torch_threads"], "row": row,
    }  # fmt: skip


def run_wsimil(args: argparse.Namespace, slide: Path) -> dict[str, Any]:
    out = _fresh(args.work / "wsi_mil_out")
    _, wall, _ = _timed(wsimil_cmd(args, slide, out), _env(args, None, pythonpath=True))
    return wsimil_figures(out, wall)


_CLAM_TIMES = {
    "seg_s": r"^segmentation took ([-\d.e]+) seconds",
    "patch_s": r"^patching took ([-\d.e]+) seconds",
    "features_s": r"^computing features for .* took ([-\d.e]+) s",
}


def parse_clam_log(text: str) -> dict[str, float]:
    """CLAM's own timers from its printed log (``create_patches_fp.py`` and ``extract_features_fp.py``)."""
    found: dict[str, float] = {}
    for key, pattern in _CLAM_TIMES.items():
        m = re.search(pattern, text, re.M)
        if m:
            found[key] = float(m.group(1))
    return found


def _marks(stderr: str) -> dict[str, Any]:
    line = next((ln for ln in stderr.splitlines() if ln.startswith("CLAM_MARKS ")), None)
    return json.loads(line.split(" ", 1)[1]) if line else {}


def run_clam(args: argparse.Namespace, source: Path, huge_pages: bool) -> dict[str, Any]:
    import h5py

    out = _fresh(args.work / "clam_out")
    env = _env(args, huge_pages, pythonpath=False)
    walls, logs, marks = [], "", {}
    for step, cmd in enumerate(clam_cmds(args, source, out)):
        if step == 1 and not (out / "patches" / f"{SLIDE_ID}.h5").is_file():
            raise RuntimeError(f"CLAM's create_patches_fp.py kept no tissue of {source} (its default a_t = 100 drops "
                               f"pieces under 26.2 Mpx); its log:\n{logs[-2000:]}")  # fmt: skip
        r, wall, start = _timed(cmd, env, cwd=Path(args.clam).resolve())
        walls.append(wall)
        logs += r.stdout
        m = _marks(r.stderr)
        if "encoder_start" in m:
            marks = {"until_model_s": m["encoder_start"] - start, "model_build_s": m["encoder_end"] - m["encoder_start"],
                     "random_init": m["random_init"]}  # fmt: skip
    times = parse_clam_log(logs)
    if set(times) != set(_CLAM_TIMES) or not marks.get("random_init"):
        raise RuntimeError(f"CLAM's log lacks {set(_CLAM_TIMES) - set(times) or 'the random-init mark'}:\n{logs[-3000:]}")
    with h5py.File(out / "features" / "h5_files" / f"{SLIDE_ID}.h5", "r") as h:
        tiles, dim = h["features"].shape
    wall_s = sum(walls)
    return {
        "wall_s": wall_s, "tiles": int(tiles), "feature_dim": int(dim), "wall_tiles_per_s": tiles / wall_s,
        "in_slide_tiles_per_s": tiles / times["features_s"], "patch_wall_s": walls[0], "features_wall_s": walls[1],
        "outside_timers_s": wall_s - sum(times.values()), **times, **marks,
    }  # fmt: skip


def encoder_alone(args: argparse.Namespace, setting: str, batch_size: int) -> float:
    """``benchmarks/extract.py``'s encoder-alone tiles/s (a fresh process) for ``setting`` (fast or fp32)."""
    sys.path.insert(0, str(HERE))
    import extract as bench_extract  # benchmarks/extract.py

    ns = argparse.Namespace(encoder="resnet50_trunc", batch_size=batch_size, threads=args.threads, encoder_tiles=args.encoder_tiles)
    return float(bench_extract.encoder_alone(ns, setting))


def run_profile(args: argparse.Namespace, slide: Path) -> list[str]:
    from _extract_profile import summarise

    out = _fresh(args.work / "wsi_mil_profile")
    figures = args.work / "profile.json"
    cmd = [sys.executable, str(HERE / "_extract_profile.py"), str(figures), "--", *wsimil_cmd(args, slide, out)[3:]]
    _, wall, _ = _timed(cmd, _env(args, True, pythonpath=True))
    res = wsimil_figures(out, wall)
    return summarise(json.loads(figures.read_text()), res["row"], wall)


# --- figures ------------------------------------------------------------------------------------------------
def med(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def report(args: argparse.Namespace, wm: list[dict[str, Any]], clam: dict[str, list[dict[str, Any]]],
           enc: list[float], enc_clam: float | None) -> list[str]:  # fmt: skip
    """The table and ratios (medians over runs)."""
    lines = [f"{'':<44}{'runs':>5}{'wall s':>9}{'tiles':>7}{'tiles/s':>9}{'in slide':>10}{'start-up s':>12}",
             "   (tiles/s: tiles / whole wall time; in slide: tiles / the slide's feature phase)"]  # fmt: skip
    precision = wm[0].get("precision", "?")
    rows = [(f"wsi-mil ({precision}, batch {args.batch_size}, THP)", wm, "startup_s")]
    rows += [(f"CLAM ({name}, batch {args.clam_batch_size}, fp32)", runs, "outside_timers_s") for name, runs in clam.items() if runs]
    for name, runs, startup in rows:
        lines.append(f"{name:<44}{len(runs):>5}{med(runs, 'wall_s'):>9.1f}{med(runs, 'tiles'):>7.0f}"
                     f"{med(runs, 'wall_tiles_per_s'):>9.1f}{med(runs, 'in_slide_tiles_per_s'):>10.1f}{med(runs, startup):>12.1f}")  # fmt: skip
    lines.append("")
    w_tps, w_wall = med(wm, "wall_tiles_per_s"), med(wm, "wall_s")
    for name, runs in clam.items():
        if runs:
            c_tps, c_wall = med(runs, "wall_tiles_per_s"), med(runs, "wall_s")
            lines.append(f"wsi-mil vs CLAM ({name}): {w_tps / c_tps:.2f}x the tiles/s, {c_wall / w_wall:.2f}x less wall time "
                         f"for the slide ({w_wall:.1f} vs {c_wall:.1f} s; tiles {med(wm, 'tiles'):.0f} vs {med(runs, 'tiles'):.0f})")  # fmt: skip
    e = statistics.median(enc)
    lines.append(f"wsi-mil in slide / encoder alone (same batch, {precision}, channels_last, threads, THP): "
                 f"{med(wm, 'in_slide_tiles_per_s'):.1f} / {e:.1f} = {med(wm, 'in_slide_tiles_per_s') / e:.3f} (target >= 0.95)")  # fmt: skip
    lines.append(f"wsi-mil start-up (wall less the batch phase: interpreter, imports, model, exit): {med(wm, 'startup_s'):.1f} s "
                 f"= {med(wm, 'startup_s') / w_wall:.0%} of the wall time (target <= 3 s); tissue, QC and grid "
                 f"{med(wm, 'prepare_s'):.1f} s; in the feature phase waiting for tiles {med(wm, 'read_s'):.1f} s, "
                 f"model {med(wm, 'model_s'):.1f} s")  # fmt: skip
    for name, runs in clam.items():
        if runs:
            lines.append(f"CLAM ({name}), medians: segmentation {med(runs, 'seg_s'):.1f} s, patching {med(runs, 'patch_s'):.1f} s, "
                         f"feature loop {med(runs, 'features_s'):.1f} s ({med(runs, 'in_slide_tiles_per_s'):.1f} tiles/s), outside its "
                         f"timers {med(runs, 'outside_timers_s'):.1f} s (imports until the model {med(runs, 'until_model_s'):.1f} s, "
                         f"model built in {med(runs, 'model_build_s'):.1f} s, the mask picture, two interpreters)")  # fmt: skip
    if enc_clam is not None and clam.get("default allocator"):
        runs = clam["default allocator"]
        lines.append(f"CLAM feature loop / encoder alone at CLAM's settings (fp32, batch {args.clam_batch_size}, "
                     f"no channels_last, default allocator; {enc_clam:.1f} tiles/s): "
                     f"{med(runs, 'in_slide_tiles_per_s') / enc_clam:.3f}; so what is not the model (reading tiles one by "
                     f"one, PIL resize and ToTensor, collating, writing) takes about "
                     f"{med(runs, 'features_s') - med(runs, 'tiles') / enc_clam:.0f} s of its {med(runs, 'features_s'):.0f} s "
                     "feature loop")  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    args.work = args.work.resolve()
    # extract.py's encoder-alone child imports wsi_mil from this checkout
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    if args.note:
        say(args.note)
    say(f"wsi-mil vs CLAM on one slide, CPU: resnet50_trunc (random init), {args.threads} torch threads")
    for line in plan(args):
        say(line)
    if args.dry_run:
        return
    from _clam_slide import ensure_slide, tissue_share

    t_start = time.perf_counter()
    slide_file = ensure_slide(args.slide_dir, args.tissue_share)
    source = args.work / "slides"  # CLAM takes every file of a folder: the slide alone
    source.mkdir(parents=True, exist_ok=True)
    slide = source / slide_file.name
    if slide.is_symlink() or slide.exists():
        slide.unlink()
    slide.symlink_to(slide_file.resolve())
    load0 = os.getloadavg()[0]
    say(f"slide: {slide_file.stat().st_size / 1e6:.0f} MB, tissue-like pixels {tissue_share(slide):.0%}; machine "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average {load0:.1f} at the start")  # fmt: skip
    say()
    wm: list[dict[str, Any]] = []
    clam: dict[str, list[dict[str, Any]]] = {"default allocator": [], "THP": []}
    enc: list[float] = []
    for rnd in range(args.rounds):
        for kind in ("default allocator", "THP"):
            wm.append(run_wsimil(args, slide))
            r = wm[-1]
            say(f"round {rnd + 1}: wsi-mil {r['wall_s']:6.1f} s, {r['tiles']} tiles, {r['wall_tiles_per_s']:5.1f} tiles/s, in slide "
                f"{r['in_slide_tiles_per_s']:5.1f}, start-up {r['startup_s']:.1f} s ({r['precision']}, {r['loader']} reads)")  # fmt: skip
            if args.clam:
                c = run_clam(args, source, huge_pages=kind == "THP")
                clam[kind].append(c)
                say(f"round {rnd + 1}: CLAM ({kind}) {c['wall_s']:6.1f} s, {c['tiles']} tiles, {c['wall_tiles_per_s']:5.1f} tiles/s, "
                    f"feature loop {c['in_slide_tiles_per_s']:5.1f} tiles/s (seg {c['seg_s']:.1f} s, patch {c['patch_s']:.1f} s, "
                    f"features {c['features_s']:.1f} s, outside its timers {c['outside_timers_s']:.1f} s)")  # fmt: skip
        enc.append(encoder_alone(args, "fast", args.batch_size))
        say(f"round {rnd + 1}: encoder alone {enc[-1]:.1f} tiles/s")
    enc_clam = None
    if args.clam and args.clam_encoder_alone:
        enc_clam = encoder_alone(args, "fp32", args.clam_batch_size)
        say(f"encoder alone at CLAM's settings: {enc_clam:.1f} tiles/s")
    say()
    for line in report(args, wm, clam, enc, enc_clam):
        say(line)
    if args.profile:
        say()
        say("where wsi-mil's in-slide time goes (one extra run):")
        for line in run_profile(args, slide):
            say(line)
    say()
    say(f"{time.perf_counter() - t_start:.0f} s in all; load average {os.getloadavg()[0]:.1f} at the end "
        "(other processes on the machine skew every figure)")  # fmt: skip
    raw = {"wsi_mil": [{k: v for k, v in r.items() if k != "row"} for r in wm], "clam": clam, "encoder_alone": enc,
           "encoder_alone_clam_settings": enc_clam}  # fmt: skip
    (args.work / "clam_compare.json").write_text(json.dumps(raw, indent=1) + "\n")
    say(f"every run's figures: {args.work / 'clam_compare.json'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
