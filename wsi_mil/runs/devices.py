"""``wsi-mil extract --devices``: one extract process per device on one node, over the shard and claim mechanism.

The parent resolves the devices (``all``: every visible CUDA device; an entry may repeat, e.g.
``cpu,cpu``) and starts one process per device with the ``spawn`` method (a fresh interpreter: CUDA
cannot be forked). Process ``k`` of ``M`` runs :func:`~wsi_mil.runs.extract.run_extract` on its device
over part ``k`` of this process's shard: with ``h`` a slide id's hash, the shard of ``--shard I/N``
(or Slurm, Kubernetes) is ``h mod N`` and the part ``(h div N) mod M``
(:func:`~wsi_mil.runs.slide_loop.part_of`), so the parts are disjoint, cover the shard, and compose
with any outer shard. Each process gets its share of the loader workers and CPU threads, and takes
the same per-slide claims as any other process on the folder (none with ``--no-claims``: the parts are
disjoint, so that is safe too). Where a slide was computed never changes its features: the config hash
leaves the device out, and mixed CPU/CUDA lists are refused.

Each process sends its records, its result and its log records (prefixed with its device, filtered at
the parent's levels) back over a pipe. The parent merges them into one summary: a process that ends
without reporting (killed, out of memory, a crash in native code) is listed as ``CRASHED`` with its
unreported slides as failed (a rerun resumes them) and the exit code is 1 even with
``--allow-failed-slides``; an error that stops a process (a config conflict, an :class:`OutputError`)
stops the run with that error once every process has ended. Ctrl-C or SIGTERM stops every process
(each records its slide as interrupted and removes its temp file) and gives exit code 130. The
parent writes the manifest once, at the end, and its own run file listing each process's
(``run[.shard-I-of-N].device-K-of-M.json``).

One module because the parent's side and the process's side speak one protocol over one pipe
(``log``, ``record``, ``result``, ``error`` messages) and share its signals rules (the first Ctrl-C
stops a process, the parent forwards it once); apart, each half would be read without the other.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from wsi_mil import errors
from wsi_mil.config import ExtractConfig
from wsi_mil.errors import ConfigError, WsiMilError
from wsi_mil.runs.slide_loop import (
    BatchSummary,
    check_unique_ids,
    run_file_name,
    select_shard,
    sigterm_as_interrupt,
)
from wsi_mil.store import RecordStore, atomic_write_json, ensure_writable_dir

logger = logging.getLogger(__name__)

#: seconds the processes get to record their slide as interrupted after Ctrl-C before they are killed
GRACE_S = 60.0


def resolve_devices(devices: Sequence[str] | str) -> list[str]:
    """The device list of ``devices``: ``"all"`` becomes every visible CUDA device; CUDA entries must be visible."""
    import torch

    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
    if devices == "all":
        if n_cuda == 0:
            raise ConfigError(
                f"--devices all: no CUDA device is visible to this process{where}. Run it where GPUs are visible, "
                "or name the devices (--devices cpu,cpu runs two processes on the CPU)."
            )
        return [f"cuda:{i}" for i in range(n_cuda)]
    missing = [d for d in devices if d.startswith("cuda:") and int(d.split(":")[1]) >= n_cuda]
    if missing:
        raise ConfigError(
            f"--devices {','.join(devices)}: {', '.join(missing)} not visible ({n_cuda} CUDA device(s){where}). "
            "Use --devices all, or the indices torch sees (0 to N-1 after CUDA_VISIBLE_DEVICES)."
        )
    return list(devices)


def share_workers(workers: int, n_processes: int, device_type: str) -> int:
    """Loader workers of each of ``n_processes``: ``workers`` split between them (at least 1; 0 stays 0);
    by default (-1) a reading thread each on CPU, and the CPUs split (up to 8 each) on CUDA."""
    from wsi_mil.features.runtime import available_cpus

    if workers == 0:
        return 0
    if workers > 0:
        return max(1, workers // n_processes)
    if device_type == "cuda":
        return max(1, min(8, (available_cpus() - n_processes) // n_processes))
    return -1


def device_labels(devices: Sequence[str]) -> list[str]:
    """Names for log lines and summaries: the device, with ``#k`` where an entry repeats (``cpu#0``, ``cpu#1``)."""
    return [d if devices.count(d) == 1 else f"{d}#{k}" for k, d in enumerate(devices)]


def extract_on_devices(
    slides: Sequence[Path],
    out_dir: Path,
    cfg: ExtractConfig,
    *,
    overwrite: bool = False,
    shard: tuple[int, int] = (0, 1),
    progress: bool | None = None,
    threads: int | None = None,
    claims: bool = True,
) -> BatchSummary:
    """``wsi-mil extract``: :func:`~wsi_mil.runs.extract.run_extract` here without ``cfg.devices`` (or with
    one device), else one process per device (see the module docstring)."""
    from wsi_mil.features.runtime import resolve_threads
    from wsi_mil.runs.extract import EXTRACT_COLUMNS, run_extract

    common: dict[str, Any] = {"overwrite": overwrite, "shard": shard, "claims": claims}
    if cfg.devices is None:
        return run_extract(slides, out_dir, cfg, progress=progress, threads=threads, **common)
    devices = resolve_devices(cfg.devices)
    cfg = cfg.model_copy(update={"devices": devices})  # config.yaml records the devices that ran ("all" resolved)
    if len(devices) == 1:
        return run_extract(slides, out_dir, cfg, progress=progress, threads=threads, process_device=devices[0], **common)
    slides = [Path(p) for p in slides]
    check_unique_ids(slides)
    out_dir = ensure_writable_dir(out_dir)  # R15: before any process starts
    n = len(devices)
    workers = share_workers(cfg.workers, n, devices[0].split(":")[0])
    n_threads = max(1, resolve_threads(threads) // n)
    labels = device_labels(devices)
    children: list[_Child] = []
    for k, (device, label) in enumerate(zip(devices, labels, strict=True)):
        mine = select_shard(slides, *shard, part=(k, n))
        if mine:
            spec = _Spec(k, n, device, label, [str(p) for p in slides], str(out_dir), cfg, overwrite, shard, claims,
                         workers, n_threads, _log_levels())  # fmt: skip
            children.append(_Child(spec, [p.stem for p in mine]))
    logger.info(
        "extract on %d devices (%s), each with %s and %d CPU thread(s): %s",
        n, ", ".join(devices), "a reading thread" if workers < 0 else f"{workers} loader worker(s)", n_threads,
        "; ".join(f"{c.spec.label} {len(c.slide_ids)} slide(s)" for c in children) or "no slides in this shard",
    )  # fmt: skip
    t0 = time.perf_counter()
    interrupted = _run_children(children, progress, sum(len(c.slide_ids) for c in children))
    summary = _merge(children, [p.stem for p in select_shard(slides, *shard)], interrupted)
    summary.seconds = time.perf_counter() - t0
    try:
        RecordStore(out_dir, EXTRACT_COLUMNS, locking=claims).write_manifest()  # once, for every process
    except OSError as exc:  # the disk may be full, or refuse the folder lock; the records are safe
        logger.error("could not write the manifest: %s", exc)
    stopped = [(kind, c.error[1]) for c in children if c.error is not None and (kind := _wsi_error(c.error[0]))]
    if stopped and not interrupted:
        kind, message = stopped[0]
        raise kind(message)  # as one process would (no run file): every process met it, e.g. a config conflict
    _write_run_file(out_dir, devices, children, summary, shard, claims)
    return summary


def _wsi_error(name: str) -> type[WsiMilError] | None:
    kind = getattr(errors, name, None)
    return kind if isinstance(kind, type) and issubclass(kind, WsiMilError) else None


# --- the parent's side --------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Spec:
    """What one process needs (pickled to it by ``spawn``)."""

    index: int
    count: int
    device: str
    label: str
    slides: list[str]
    out_dir: str
    cfg: ExtractConfig
    overwrite: bool
    shard: tuple[int, int]
    claims: bool
    workers: int
    threads: int
    log_levels: dict[str, int]


@dataclass
class _Child:
    spec: _Spec
    slide_ids: list[str]
    process: Any = None
    reader: Connection | None = None
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    error: tuple[str, str] | None = None
    killed: bool = False

    @property
    def done(self) -> bool:
        return self.reader is None and (self.process is None or self.process.exitcode is not None)


def _log_levels() -> dict[str, int]:
    """The parent's logger levels (root and any set explicitly), for its processes to log at."""
    levels = {"": logging.getLogger().getEffectiveLevel()}
    for name, obj in logging.Logger.manager.loggerDict.items():
        if isinstance(obj, logging.Logger) and obj.level != logging.NOTSET:
            levels[name] = obj.level
    return levels


def _run_children(children: list[_Child], progress: bool | None, n_slides: int) -> bool:
    """Start the processes, relay what they send until all have ended; True when interrupted."""
    from wsi_mil.progress import progress_bar

    ctx = multiprocessing.get_context("spawn")
    bar = progress_bar(total=n_slides, desc="slides", unit="slide", enable=progress)
    interrupted = False
    try:
        with sigterm_as_interrupt(keep_handler=False, ignore_sigxfsz=False):
            try:
                for child in children:
                    reader, writer = ctx.Pipe(duplex=False)
                    process = ctx.Process(
                        target=_process_main, args=(child.spec, writer), name=f"wsi-mil-extract {child.spec.label}"
                    )
                    process.start()
                    writer.close()  # the process holds the only writing end: its end is our EOF
                    child.process, child.reader = process, reader
                    logger.info("%s: process %d", child.spec.label, child.process.pid)
                _relay(children, bar, deadline=None)
            except KeyboardInterrupt:
                interrupted = True
                logger.warning("interrupted: stopping %d process(es)", sum(not c.done for c in children))
                for child in children:
                    _signal(child, signal.SIGINT)  # each process takes the first signal only
                try:
                    _relay(children, bar, deadline=time.monotonic() + GRACE_S)
                except KeyboardInterrupt:
                    pass  # a second Ctrl-C: do not wait
    finally:
        for child in children:
            if not child.done:
                child.killed = True
                _signal(child, signal.SIGKILL)
        with contextlib.suppress(KeyboardInterrupt):
            _relay(children, bar, deadline=time.monotonic() + 10)
        bar.close()
    return interrupted


def _signal(child: _Child, sig: int) -> None:
    if child.process is not None and child.process.exitcode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.process.pid, sig)


def _relay(children: list[_Child], bar: Any, deadline: float | None) -> None:
    """Handle what the processes send until every one has ended (or ``deadline``)."""
    while True:
        live = [c for c in children if not c.done and c.process is not None]
        if not live or (deadline is not None and time.monotonic() > deadline):
            return
        waitables: list[Any] = [c.reader for c in live if c.reader is not None]
        waitables += [c.process.sentinel for c in live if c.process.exitcode is None]
        wait(waitables, timeout=1.0)
        for child in live:
            _drain(child, bar)
            if child.reader is None or child.process.exitcode is not None:
                child.process.join(timeout=0.1)
            if child.done and child.result is None and child.error is None and not child.killed:
                logger.error(  # said now: the other processes may go on for hours
                    "%s (process %d) ended (%s) without reporting; the others go on", child.spec.label,
                    child.process.pid, _exit_text(child.process.exitcode),
                )  # fmt: skip


def _drain(child: _Child, bar: Any) -> None:
    """Read every message ``child`` has sent; close its pipe at its end, or once it has exited and
    nothing is left (a loader process it left behind may still hold the pipe open)."""
    reader = child.reader
    if reader is None:
        return
    try:
        while reader.poll(0):
            kind, payload = reader.recv()
            if kind == "log":
                target = logging.getLogger(payload.name)
                if target.isEnabledFor(payload.levelno):
                    target.handle(payload)
            elif kind == "record":
                child.records[payload["slide_id"]] = payload
                bar.update(1)
            elif kind == "result":
                child.result = payload
            elif kind == "error":
                child.error = payload
    except (EOFError, OSError):
        pass
    else:
        if child.process.exitcode is None:
            return
    reader.close()
    child.reader = None


def _exit_text(code: int | None) -> str:
    if code is None:
        return "no exit code"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


def _merge(children: list[_Child], order: list[str], interrupted: bool) -> BatchSummary:
    """One summary of every process: its final records, or what it reported before it ended."""
    summary = BatchSummary(interrupted=interrupted or any(bool(c.result and c.result["interrupted"]) for c in children))
    by_id: dict[str, dict[str, Any]] = {}
    for child in children:
        final = child.result["records"] if child.result is not None else None
        by_id.update((r["slide_id"], r) for r in (final if final is not None else child.records.values()))
        if child.result is not None or (child.error is not None and _wsi_error(child.error[0])):
            continue  # it reported, or stopped with an error the run raises
        code = child.process.exitcode if child.process is not None else None
        how = f"was killed after the {GRACE_S:.0f} s grace" if child.killed else f"ended ({_exit_text(code)})"
        if child.error is not None:  # an unexpected exception: its traceback was logged
            how = f"stopped by {child.error[0]}: {child.error[1]}"
        left = [s for s in child.slide_ids if s not in by_id]
        summary.crashed.append(
            f"{child.spec.label} (process {child.process.pid if child.process else '-'}) {how} before reporting "
            f"{len(left)} of its {len(child.slide_ids)} slide(s): rerun the same command to resume them"
        )
        if interrupted:
            continue
        for slide_id in left:
            by_id[slide_id] = {
                "slide_id": slide_id,
                "status": "failed",
                "error_class": errors.ProcessCrashError.__name__,
                "error": f"the process on {child.spec.label} {how} before finishing this slide; rerun to resume",
            }
    summary.records = [by_id[s] for s in order if s in by_id]
    return summary


def _write_run_file(
    out_dir: Path, devices: list[str], children: list[_Child], summary: BatchSummary, shard: tuple[int, int], claims: bool
) -> None:
    done = [r for r in summary.records if r.get("status") == "done"]
    tiles = int(sum(int(r.get("n_tiles") or 0) for r in done))
    seconds = round(summary.seconds, 3)
    name = run_file_name(shard)
    try:
        atomic_write_json(
            out_dir / name,
            {
                "command": "extract",
                "devices": devices,
                "shard": list(shard),
                "claims": claims,
                "processes": [
                    {
                        "device": c.spec.device,
                        "label": c.spec.label,
                        "part": [c.spec.index, c.spec.count],
                        "pid": c.process.pid if c.process is not None else None,
                        "exit": _exit_text(c.process.exitcode if c.process is not None else None),
                        "slides": len(c.slide_ids),
                        "run_file": run_file_name(shard, (c.spec.index, c.spec.count)),
                    }
                    for c in children
                ],
                "crashed": summary.crashed,
                "interrupted": summary.interrupted,
                "totals": {
                    "slides": len(summary.records),
                    "by_status": dict(summary.counts),
                    "tiles": tiles,
                    "seconds": seconds,
                    "tiles_per_s": round(tiles / max(seconds, 1e-9), 2),
                },
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )
    except OSError as exc:
        logger.error("could not write %s: %s", name, exc)


# --- one process ---------------------------------------------------------------------------------------
class _Channel:
    """The writing end of the pipe to the parent, shared by this process's threads."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def send(self, kind: str, payload: Any) -> None:
        with self._lock:
            self._conn.send((kind, payload))


class _ToParent(logging.Handler):
    """Sends log records to the parent (which filters them at its own levels), prefixed with the device."""

    def __init__(self, channel: _Channel, label: str) -> None:
        super().__init__()
        self._channel = channel
        self._label = label

    def emit(self, record: logging.LogRecord) -> None:
        try:
            out = copy.copy(record)
            text = f"[{self._label}] {record.getMessage()}"
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            out.msg, out.args, out.exc_info, out.exc_text = text, None, None, None
            self._channel.send("log", out)
        except Exception:
            self.handleError(record)


def _stop_once(signum: int, frame: Any) -> None:
    """Ctrl-C reaches a process twice (from the terminal and from the parent): the first one stops it,
    later ones must not break its clean-up (recording the slide as interrupted, removing its temp file)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def _logging_to(channel: _Channel, spec: _Spec) -> Iterator[None]:
    """This spawned process logs through the parent, at the parent's levels (it has no handlers of its own)."""
    root = logging.getLogger()
    for name, level in spec.log_levels.items():
        logging.getLogger(name or None).setLevel(level)
    handler = _ToParent(channel, spec.label)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)


def _process_main(spec: _Spec, conn: Connection) -> None:
    """The body of one process: ``run_extract`` on its device over its part, reporting to the parent."""
    os.environ["OMP_NUM_THREADS"] = str(spec.threads)  # before torch starts its thread pool
    signal.signal(signal.SIGINT, _stop_once)
    signal.signal(signal.SIGTERM, _stop_once)
    channel = _Channel(conn)
    with _logging_to(channel, spec):
        try:
            if spec.device.startswith("cuda"):
                import torch

                torch.cuda.set_device(torch.device(spec.device))  # pinned memory and contexts on this GPU only
            from wsi_mil.runs.extract import run_extract

            summary = run_extract(
                [Path(p) for p in spec.slides], Path(spec.out_dir), spec.cfg, overwrite=spec.overwrite,
                shard=spec.shard, progress=False, threads=spec.threads, claims=spec.claims,
                process_device=spec.device, process_workers=spec.workers, part=(spec.index, spec.count),
                on_record=lambda record: channel.send("record", record), write_manifest=False,
            )  # fmt: skip
            channel.send("result", {"records": summary.records, "interrupted": summary.interrupted})
        except KeyboardInterrupt:  # before or after its batch: what it sent stands
            channel.send("result", {"records": None, "interrupted": True})
        except WsiMilError as exc:
            channel.send("error", (type(exc).__name__, str(exc)))
        except Exception as exc:
            logger.exception("the process on %s stopped", spec.label)
            channel.send("error", (type(exc).__name__, str(exc)))
        finally:
            conn.close()
