"""Where ``wsi-mil extract``'s time goes inside a slide: one in-process run with timers and torch.profiler.

``clam_compare.py --profile`` runs ``python _extract_profile.py OUT.json -- <wsi-mil arguments>`` in a fresh
process. The library is not changed; its functions are wrapped here (as ``startup.py`` does):

* compute (main) thread, wall seconds: waiting for tiles (the record's ``read_s``), the transform
  (``TileTransform``: uint8 to float, resize 256 -> 224, normalisation, memory format), the model's forward,
  what follows it (``.float()``, ``cat``, ``.numpy()``: model time less the two), the bag writer's ``append``,
  and the rest of the slide loop; the slide's preparation (tissue, QC pictures, grid) apart;
* reading thread, wall seconds: the backend's decode (``_read_rgba``: OpenSlide/tiffslide), compositing the
  RGBA region on white (rest of ``Slide.read_region``), and cutting rows into tiles (rest of ``read_tiles``);
* CPU seconds by thread over the batch phase (``/proc/self/task``, ``getrusage``, ``time.thread_time``):
  the compute thread, torch's other intra-op thread(s), the reading thread, the rest;
* torch.profiler (CPU) over the batch phase: self CPU time of each op under the transform, under the
  forward, and elsewhere.

The figures go to OUT.json; ``summarise`` turns them into the printed table.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

RANGES = ("wsi:transform", "wsi:forward", "wsi:write")


def _thread_cpu() -> dict[int, tuple[str, float]]:
    """tid -> (name, user+system CPU seconds) of this process's live threads."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[str, float]] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            name = (task / "comm").read_text().strip()
        except OSError:  # the thread ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


def _process_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class _Clock:
    """Wall seconds per key, summed over calls (thread-safe enough: one writer per key)."""

    def __init__(self) -> None:
        self.s: dict[str, float] = defaultdict(float)
        self.n: dict[str, int] = defaultdict(int)

    def wrap(self, fn: Any, key: str, only_reader: bool = False, label: str | None = None) -> Any:
        clock = self

        def wrapped(*a: Any, **k: Any) -> Any:
            if only_reader and not threading.current_thread().name.startswith("wsi-mil-read"):
                return fn(*a, **k)
            t0 = time.perf_counter()
            if label is None:
                out = fn(*a, **k)
            else:
                import torch

                with torch.profiler.record_function(label):
                    out = fn(*a, **k)
            clock.s[key] += time.perf_counter() - t0
            clock.n[key] += 1
            return out

        return wrapped


class _Timed:
    """Stands in for the encoder's model: times each call; ``nn.Module`` attributes pass through."""

    def __init__(self, inner: Any, clock: _Clock) -> None:
        self._inner, self._call = inner, clock.wrap(inner, "forward", label="wsi:forward")

    def __call__(self, *a: Any, **k: Any) -> Any:
        return self._call(*a, **k)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def child(out_json: Path, argv: list[str]) -> None:
    """Run ``wsi-mil <argv>`` here with the wrappers and the profiler; write the figures to ``out_json``."""
    import torch

    import wsi_mil.features.encoders as fe
    import wsi_mil.runs.extract as rx
    from wsi_mil.cli import main
    from wsi_mil.features.stream import ThreadBatches, TileBatches
    from wsi_mil.features.transforms import TileTransform
    from wsi_mil.slide import readers
    from wsi_mil.slide.base import Slide
    from wsi_mil.store.bag_file import BagWriter

    clock = _Clock()
    info: dict[str, Any] = {}
    chosen = fe.Encoder.inference_model

    def inference_model(self: Any, *a: Any, **k: Any) -> Any:
        return _Timed(chosen(self, *a, **k), clock)  # the model extract runs (fused for the CPU or not)

    fe.Encoder.inference_model = inference_model  # type: ignore[method-assign]
    TileTransform.__call__ = clock.wrap(TileTransform.__call__, "transform", label="wsi:transform")  # type: ignore[method-assign]
    BagWriter.append = clock.wrap(BagWriter.append, "write", label="wsi:write")  # type: ignore[method-assign]
    TileBatches.read_tiles = clock.wrap(TileBatches.read_tiles, "read_tiles", only_reader=True)  # type: ignore[method-assign]
    Slide.read_region = clock.wrap(Slide.read_region, "read_region", only_reader=True)  # type: ignore[method-assign]
    for cls in (readers.OpenSlideSlide, readers.TiffSlideSlide):
        cls._read_rgba = clock.wrap(cls._read_rgba, "decode", only_reader=True)  # type: ignore[method-assign]
    read_thread = ThreadBatches._read

    def timed_read(self: Any) -> None:
        try:
            read_thread(self)
        finally:
            info["reader_cpu_s"] = info.get("reader_cpu_s", 0.0) + time.thread_time()

    ThreadBatches._read = timed_read  # type: ignore[method-assign]
    run_batch = rx.run_batch

    def profiled_run_batch(*a: Any, **k: Any) -> Any:
        before = {"wall": time.perf_counter(), "process": _process_cpu(), "main": time.thread_time(), "threads": _thread_cpu()}
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = run_batch(*a, **k)
        after = {"wall": time.perf_counter(), "process": _process_cpu(), "main": time.thread_time(), "threads": _thread_cpu()}
        main_tid = threading.get_native_id()
        others = sum(cpu - before["threads"].get(tid, (name, 0.0))[1]
                     for tid, (name, cpu) in after["threads"].items() if tid != main_tid)  # fmt: skip
        info["batch_wall_s"] = after["wall"] - before["wall"]
        info["process_cpu_s"] = after["process"] - before["process"]
        info["main_cpu_s"] = after["main"] - before["main"]
        info["other_live_threads_cpu_s"] = others  # torch's intra-op thread(s) and any thread still alive
        info["ops"] = _ops_by_range(prof)
        return out

    rx.run_batch = profiled_run_batch  # type: ignore[assignment]
    try:
        main.main(args=argv, standalone_mode=False)
    finally:
        info["clock_s"], info["calls"] = dict(clock.s), dict(clock.n)
        out_json.write_text(json.dumps(info))


def _ops_by_range(prof: Any) -> dict[str, dict[str, float]]:
    """Self CPU seconds per op name, under each of :data:`RANGES` (innermost) or ``other``."""
    table: dict[str, dict[str, float]] = {r: defaultdict(float) for r in (*RANGES, "other")}
    for ev in prof.events():
        if ev.name in RANGES:
            continue
        parent, where = ev.cpu_parent, "other"
        while parent is not None:
            if parent.name in RANGES:
                where = parent.name
                break
            parent = parent.cpu_parent
        table[where][ev.name] += ev.self_cpu_time_total / 1e6
    return {k: dict(v) for k, v in table.items()}


def _category(op: str) -> str:
    name = op.lower()
    for key, words in (
        ("convolution", ("conv",)),
        ("resize", ("upsample", "interpolate", "_aa")),
        ("casts and copies", ("copy", "_to_", "aten::to", "contiguous", "clone", "cat", "empty", "as_strided", "view")),
        ("batch norm", ("batch_norm",)),
        ("pooling", ("pool",)),
        ("elementwise", ("relu", "add", "mul", "sub", "div", "clamp", "round")),
    ):
        if any(w in name for w in words):
            return key
    return "other ops"


def summarise(info: dict[str, Any], record: dict[str, Any], wall_s: float) -> list[str]:
    """The printed breakdown of one profiled run (``record``: its manifest row, ``wall_s``: its process wall)."""
    c = info["clock_s"]
    n_tiles = int(record["n_tiles"])
    encode_s = float(record["seconds"]) - float(record["prepare_s"])
    read_s, model_s = float(record["read_s"]), float(record["model_s"])
    after = model_s - c.get("transform", 0.0) - c.get("forward", 0.0)
    rest = encode_s - read_s - model_s - c.get("write", 0.0)
    lines = [f"   profiled run: {n_tiles} tiles, encode phase {encode_s:.1f} s = {n_tiles / encode_s:.1f} tiles/s "
             f"(timers and torch.profiler on), process wall {wall_s:.1f} s",  # fmt: skip
             "   compute thread, wall s (share of the encode phase):"]
    for name, s in (("waiting for tiles", read_s), ("transform: to float, resize 256->224, normalise", c.get("transform", 0.0)),
                    ("model forward", c.get("forward", 0.0)), ("after the forward: .float(), cat, .numpy()", after),
                    ("writing (BagWriter.append)", c.get("write", 0.0)), ("rest of the loop", rest)):  # fmt: skip
        lines.append(f"     {name:<52} {s:7.2f} s  {100 * s / encode_s:5.1f} %")
    lines.append(f"     {'(before: tissue, QC pictures, grid)':<52} {float(record['prepare_s']):7.2f} s")
    dec, region, tiles = c.get("decode", 0.0), c.get("read_region", 0.0), c.get("read_tiles", 0.0)
    lines.append(f"   reading thread, wall s: {tiles:.2f} for {info['calls'].get('read_tiles', 0)} reads of up to 32 tiles "
                 f"= decode {dec:.2f} + composite on white {region - dec:.2f} + rows to tiles {tiles - region:.2f}")  # fmt: skip
    wall = info["batch_wall_s"]
    reader = info.get("reader_cpu_s", 0.0)
    main_cpu, others, total = info["main_cpu_s"], info["other_live_threads_cpu_s"], info["process_cpu_s"]
    lines.append(f"   CPU s over the batch phase ({wall:.1f} s wall, {os.cpu_count()} CPUs = {wall * (os.cpu_count() or 1):.1f} CPU s): "
                 f"compute thread {main_cpu:.1f}, torch's other thread(s) {others:.1f}, reading thread {reader:.1f}, "
                 f"rest {total - main_cpu - others - reader:.1f}; in all {total:.1f}")  # fmt: skip
    ops = info["ops"]
    for where, title in (("wsi:transform", "transform"), ("wsi:forward", "forward"), ("other", "elsewhere")):
        cats: dict[str, float] = defaultdict(float)
        for op, s in ops.get(where, {}).items():
            cats[_category(op)] += s
        top = sorted(ops.get(where, {}).items(), key=lambda kv: -kv[1])[:4]
        lines.append(f"   torch ops {title:<10} self CPU s: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(cats.items(), key=lambda kv: -kv[1]))
                     + "; top: " + ", ".join(f"{k} {v:.2f}" for k, v in top))  # fmt: skip
    return lines


if __name__ == "__main__":
    sep = sys.argv.index("--")
    child(Path(sys.argv[1]), sys.argv[sep + 1 :])
