"""Where the start-up of ``wsi-mil extract`` goes: the phases until the first tile batch is encoded.

Runs ``wsi-mil extract`` on one sample slide in fresh processes (``--repeats``, interleaved with the
``--compare`` checkout when given, e.g. the main checkout before a change) and prints, per phase, the
median time since the interpreter started:

    cli          the click command line imported (``wsi-mil --help`` costs this)
    torch        ``wsi_mil.runs.extract`` imported, which imports torch
    timm         timm imported (with torchvision; ``torch._dynamo`` too unless the checkout has ``import_timm``)
    encoder      the encoder built and its weights loaded and hashed
    model ready  the model extract runs made (on the CPU a CNN's convolutions fused with batch norm,
                 ReLU and add: ``Encoder.inference_model``; ``-`` for a checkout from before it)
    batch loop   the slide loop started (config written, loader chosen)
    slide ready  the first slide opened, its tissue found, its grid laid
    first batch  the first batch of tiles encoded (the child process ends there: what follows is
                 the steady state that ``extract.py`` measures)

and, for reference, ``python -c "import torch"`` and ``python -c "import torch, timm"`` (the import floor).
Marks come from wrappers around the library's functions (no profiler overhead); a phase whose function a
checkout does not have is shown as ``-``.

    python benchmarks/startup.py --out benchmarks/results/startup.txt
    python benchmarks/startup.py --compare /work/main --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("cli", "torch", "timm", "encoder", "model ready", "batch loop", "slide ready", "first batch")


def _child(argv: list[str]) -> None:
    """One instrumented ``wsi-mil extract`` (``argv``: its arguments); the marks as JSON on stderr."""
    t0 = time.perf_counter() - (time.time() - float(os.environ["WSI_MIL_STARTUP_T0"]))
    marks: dict[str, float] = {}

    def mark(name: str) -> None:
        marks.setdefault(name, round(time.perf_counter() - t0, 3))

    from wsi_mil.cli import main

    mark("cli")
    import wsi_mil.runs.extract as rx

    mark("torch")
    import wsi_mil.features.encoders as fe

    create = fe.create_encoder

    def create_encoder(*a: Any, **k: Any) -> Any:
        try:  # the way the checkout imports timm (import_timm: without torch._dynamo)
            from wsi_mil.features.timm_import import import_timm
        except ImportError:
            import timm  # noqa: F401
        else:
            import_timm()
        mark("timm")
        enc = create(*a, **k)
        mark("encoder")
        if not hasattr(enc, "inference_model"):  # a checkout from before it: extract ran enc.model
            enc.model = _FirstCall(enc.model, lambda: _finish(mark, marks))
        return enc

    if hasattr(fe.Encoder, "inference_model"):  # the model extract runs (fused for the CPU or not)
        chosen = fe.Encoder.inference_model

        def inference_model(self: Any, *a: Any, **k: Any) -> Any:
            model = chosen(self, *a, **k)
            mark("model ready")
            return _FirstCall(model, lambda: _finish(mark, marks))

        fe.Encoder.inference_model = inference_model

    fe.create_encoder = create_encoder
    for name, phase in (("run_batch", "batch loop"), ("prepare_slide", "slide ready")):
        if hasattr(rx, name):
            setattr(rx, name, _after(getattr(rx, name), phase, mark, before=name == "run_batch"))
    main.main(args=argv)  # exits 130 when _finish stops it
    raise SystemExit("the extraction ended before a batch was encoded")


def _finish(mark: Any, marks: dict[str, float]) -> None:
    mark("first batch")
    print("STARTUP_MARKS " + json.dumps(marks), file=sys.stderr, flush=True)
    # The rest of the slide is not start-up: stop as Ctrl-C does, so that loader processes are shut down.
    raise KeyboardInterrupt("start-up measured")


def _after(fn: Any, phase: str, mark: Any, before: bool) -> Any:
    def wrapped(*a: Any, **k: Any) -> Any:
        if before:
            mark(phase)
        out = fn(*a, **k)
        mark(phase)
        return out

    return wrapped


class _FirstCall:
    """A callable stand-in for the encoder's model that marks its first call (``nn.Module`` methods pass through)."""

    def __init__(self, inner: Any, on_first: Any) -> None:
        self._inner, self._on_first = inner, on_first

    def __call__(self, *a: Any, **k: Any) -> Any:
        out = self._inner(*a, **k)
        self._on_first()
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _one(repo: Path, slide_dir: Path, out: Path, extra: list[str]) -> dict[str, float]:
    import shutil

    if out.exists():
        shutil.rmtree(out)
    env = {**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1", "THP_MEM_ALLOC_ENABLE": "1",
           "WSI_MIL_STARTUP_T0": repr(time.time())}  # fmt: skip
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "-q", "extract", str(slide_dir), "--out", str(out), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    line = next((ln for ln in r.stderr.splitlines() if ln.startswith("STARTUP_MARKS ")), None)
    if r.returncode != 130 or line is None:  # 130: stopped after the first batch as by Ctrl-C
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(line.split(" ", 1)[1])


def _import_floor(code: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        _child(argv[1:])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compare", type=Path, default=None, help="another checkout, measured interleaved (e.g. before a change)")
    p.add_argument("--cohort", type=Path, default=Path("/tmp/wsi_mil_bench/cohort"), help="sample cohort (built if missing)")
    p.add_argument("--slide", default="case004_A.svs", help="the one slide extracted")
    p.add_argument("--work", type=Path, default=Path("/tmp/wsi_mil_bench/startup"))
    p.add_argument("--extract-args", default="", help="extra `wsi-mil extract` flags, e.g. '--workers 2' or '--encoder resnet50_trunc --random-init'")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not (args.cohort / "slides").is_dir():
        subprocess.run([sys.executable, "-m", "wsi_mil", "-q", "sample-data", str(args.cohort)], check=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    slide_dir = args.work / "slide"
    slide_dir.mkdir(parents=True, exist_ok=True)
    link = slide_dir / args.slide
    if not link.exists():
        link.symlink_to((args.cohort / "slides" / args.slide).resolve())
    repos = {"this checkout": ROOT} | ({"compare": args.compare.resolve()} if args.compare else {})
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in repos}
    floors: dict[str, list[float]] = {"import torch": [], "import torch, timm": []}
    load0 = os.getloadavg()[0]
    for _ in range(args.repeats):
        for name, repo in repos.items():
            runs[name].append(_one(repo, slide_dir, args.work / "out", args.extract_args.split()))
        for code in floors:
            floors[code].append(_import_floor(code))
    names = {name: (str(repo) if name == "compare" else name) for name, repo in repos.items()}
    lines = [f"wsi-mil extract start-up, one sample slide ({args.slide}), {args.repeats} fresh processes per checkout "
             f"(median), extra flags: {args.extract_args or 'none'}; load average {load0:.1f} at the start, "
             f"{os.getloadavg()[0]:.1f} at the end", "",
             f"{'phase':<14}" + "".join(f"{names[n][-16:] + ': at':>22}{'took':>8}" for n in repos)]  # fmt: skip
    for i, phase in enumerate(PHASES):
        cells = []
        for name in repos:
            at = [r[phase] for r in runs[name] if phase in r]
            took = [r[phase] - max([0.0] + [r[p] for p in PHASES[:i] if p in r]) for r in runs[name] if phase in r]
            cells.append((f"{statistics.median(at):>20.2f} s" if at else f"{'-':>22}")
                         + (f"{statistics.median(took):>6.2f} s" if took else f"{'-':>8}"))  # fmt: skip
        lines.append(f"{phase:<14}" + "".join(cells))
    for code, vals in floors.items():
        lines.append(f"{'python -c ' + repr(code):<42} {statistics.median(vals):.2f} s (import floor)")
    lines.append("raw marks: " + json.dumps(runs))
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
