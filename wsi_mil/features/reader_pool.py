"""Tile-reading processes that live for a whole run and move from slide to slide.

:class:`ReaderPool` starts its worker processes once per run, in the background (``forkserver``: the server
preloads this module, so each worker forks from a clean, single-threaded process that imported torch and the
slide readers once). The run submits each prepared slide (:meth:`ReaderPool.submit`: its picklable
:class:`~wsi_mil.features.stream.TileSource`, its level-0 coords and its read batches) and iterates over the
:class:`SlideBatches` it gets back: that slide's batches in order, holding exactly what
:class:`~wsi_mil.features.stream.TileBatches` reads in series. Batches go to the workers in the order the
slides were submitted, at most ``depth`` unconsumed per worker (memory stays bounded), so a slide submitted
while the one before is still being encoded is read as soon as a worker has room, and its first batches are
waiting when the model gets to it.

* Tile tensors come back through shared memory (``torch.multiprocessing`` pickles tensors as the DataLoader's
  workers do) and are pinned here when ``pin`` (CUDA). Each worker has its own task queue and its own result
  pipe: a worker killed mid-write holds no lock that the others need, and the run waits on the pipes and the
  processes' sentinels together, so it sees a death at once.
* A worker opens a slide (:func:`~wsi_mil.slide.open_slide`) when it first reads from it, once: workers only
  move forward through the submitted slides, keep at most :data:`MAX_OPEN_SLIDES` open and close a slide when
  the run is done with it. A file the run already checked (``verified_stamp``, unchanged) is not scanned for
  truncation again. :attr:`ReaderPool.opens` counts the opens by worker and slide.
* A read error fails only its slide: it is raised where that batch is consumed, with the worker's exception
  type and message. A worker that dies fails the slide it was reading with :class:`ReaderProcessError`; a new
  worker takes its place and reads again what it held of other slides. A slide dropped mid-way
  (:meth:`SlideBatches.close`) is not read further and its late results are discarded (a worker may still
  read the few batches it had queued).
* :meth:`ReaderPool.close` stops the workers, terminating and joining those that do not stop, so none
  outlives the run or holds its terminal's pipes; a worker whose run was killed exits by itself within
  :data:`POLL_S` of finishing its current batch.

One module, over 400 lines, because the run's side (handing out batches, taking results in order,
replacing a dead worker) and the worker's loop speak one message protocol and share one bookkeeping of
what each worker holds; apart, neither could be read or changed without the other.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing.connection
import os
import pickle
import queue
import signal
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.multiprocessing

from wsi_mil.errors import ReaderProcessError, SlideReadError
from wsi_mil.features.stream import PREFETCH_BATCHES, TileBatches, TileSource

logger = logging.getLogger(__name__)

#: seconds between liveness checks: of the workers by the run, of the run by each worker
POLL_S = 0.5
#: slides a worker keeps open at once (the one it reads, the next one)
MAX_OPEN_SLIDES = 2
#: seconds the workers get to stop by themselves at :meth:`ReaderPool.close` before they are terminated
STOP_GRACE_S = 1.0


def _context() -> Any:
    """The ``forkserver`` context, its server preloading this module (torch and the slide readers)."""
    ctx = torch.multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])  # no effect once the server runs; it preloaded already
    return ctx


class _Job:
    """One submitted slide: what is still to hand out, what came back, what failed."""

    def __init__(self, job_id: int, source: TileSource, coords: np.ndarray, batches: list[list[int]]) -> None:
        self.id = job_id
        self.source = source
        self.coords = coords
        self.batches = batches
        self.pending: deque[int] = deque(range(len(batches)))  # batch numbers to hand out, ascending
        self.results: dict[int, tuple[torch.Tensor, np.ndarray]] = {}
        self.next_seq = 0  # the batch the consumer waits for
        self.error: tuple[int, BaseException] | None = None  # the first failed batch and its error
        self.cancelled = False

    def fail(self, seq: int, exc: BaseException) -> None:
        if self.error is None or seq < self.error[0]:
            self.error = (seq, exc)

    def requeue(self, seq: int) -> None:
        self.pending = deque(sorted({*self.pending, seq}))

    @property
    def stop_seq(self) -> int:
        """Batches from here on are not needed (the slide fails at its first failed batch)."""
        return self.error[0] if self.error is not None else len(self.batches)


@dataclass
class _Worker:
    slot: int
    process: Any
    tasks: Any  # the worker's task queue
    results: Any  # the reading end of its result pipe
    outstanding: dict[tuple[int, int], None] = field(default_factory=dict)  # (job, batch) in the order sent
    slides: set[int] = field(default_factory=set)  # jobs it was given batches of
    eof: bool = False


class ReaderPool:
    """``n_workers`` tile-reading processes serving batches of the slides submitted, slide after slide."""

    def __init__(self, n_workers: int, *, pin: bool = False, depth: int = PREFETCH_BATCHES) -> None:
        if n_workers < 1:
            raise ValueError(f"a reader pool needs at least one worker, not {n_workers}")
        self.n_workers = n_workers
        self.depth = max(1, int(depth))
        self.pin = pin
        #: slide opens by (worker pid, slide path)
        self.opens: Counter[tuple[int, str]] = Counter()
        self._ctx = _context()
        self._lock = threading.RLock()
        self._workers: list[_Worker | None] = [None] * n_workers
        self._jobs: dict[int, _Job] = {}  # in submission order
        self._paths: dict[int, str] = {}
        self._next_id = 0
        self._closed = False
        self._start_error: BaseException | None = None
        self._started = threading.Event()
        self._starter = threading.Thread(target=self._start_all, name="wsi-mil-reader-start", daemon=True)
        self._starter.start()

    # --- workers --------------------------------------------------------------------------------------
    def _start_all(self) -> None:
        try:
            for slot in range(self.n_workers):
                if self._closed:
                    return
                worker = self._start_worker(slot)
                with self._lock:
                    self._workers[slot] = worker
                    self._dispatch()
        except BaseException as exc:  # raised where batches are waited for
            self._start_error = exc
        finally:
            self._started.set()

    def _start_worker(self, slot: int) -> _Worker:
        tasks = self._ctx.Queue()
        receiver, sender = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(
            target=_worker_main, args=(tasks, sender, os.getpid()), name=f"wsi-mil-reader-{slot}", daemon=True
        )
        process.start()
        sender.close()  # the worker holds the only writing end: its death reads as the pipe's end
        return _Worker(slot, process, tasks, receiver)

    def worker_pids(self) -> list[int]:
        """The process ids of the workers (once they have started)."""
        self._started.wait()
        with self._lock:
            return [w.process.pid for w in self._workers if w is not None]

    # --- handing out batches --------------------------------------------------------------------------
    def submit(self, source: TileSource, coords: np.ndarray, batches: Sequence[Sequence[int]]) -> SlideBatches:
        """Queue a slide's batches (``batches``: lists of indices into ``coords``) behind those submitted before."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the tile reader pool is closed")
            job = _Job(self._next_id, source, np.asarray(coords, dtype=np.int64), [list(b) for b in batches])
            self._next_id += 1
            self._jobs[job.id] = job
            self._paths[job.id] = source.path
            self._dispatch()
        return SlideBatches(self, job)

    def _dispatch(self) -> None:
        """Hand out batches, slide by slide in submission order, while workers have room (lock held)."""
        if self._closed:
            return
        for job in list(self._jobs.values()):
            if job.cancelled:
                continue
            while job.pending and job.pending[0] < job.stop_seq:
                room = [w for w in self._workers if w is not None and len(w.outstanding) < self.depth]
                if not room:
                    return
                worker = min(room, key=lambda w: (len(w.outstanding), w.slot))
                seq = job.pending.popleft()
                worker.tasks.put(("read", job.id, seq, job.source, job.coords[job.batches[seq]]))
                worker.outstanding[(job.id, seq)] = None
                worker.slides.add(job.id)

    def _release(self, job: _Job) -> None:
        """The run is done with ``job``: forget it and let the workers close its slide (lock held)."""
        self._jobs.pop(job.id, None)
        job.results.clear()
        for worker in self._workers:
            if worker is not None and job.id in worker.slides:
                worker.slides.discard(job.id)
                worker.tasks.put(("close", job.id))
        self._dispatch()

    def _cancel(self, job: _Job) -> None:
        with self._lock:
            if job.id in self._jobs:
                job.cancelled = True
                self._release(job)

    # --- taking batches -------------------------------------------------------------------------------
    def _next_batch(self, job: _Job) -> dict[str, Any] | None:
        """The job's next batch in order, ``None`` after its last; raises the error of a failed batch."""
        while True:
            with self._lock:
                if job.next_seq >= len(job.batches):
                    if job.id in self._jobs:
                        self._release(job)
                    return None
                if job.cancelled:  # never a short bag: whoever dropped the slide must not read it on
                    raise RuntimeError(f"the batches of {job.source.path} were dropped before all were read")
                item = job.results.pop(job.next_seq, None)
                if item is not None:
                    seq = job.next_seq
                    job.next_seq += 1
                    if job.next_seq == len(job.batches):
                        self._release(job)  # workers close the slide while the model encodes the last batch
                    break
                if job.error is not None and job.error[0] == job.next_seq:
                    raise job.error[1]
                if self._closed:
                    raise RuntimeError("the tile reader pool was closed while a slide was read")
            self._receive()
        tiles, ok = item
        if self.pin:
            tiles = tiles.pin_memory()
        return {"tiles": tiles, "index": torch.as_tensor(job.batches[seq]), "ok": torch.from_numpy(ok)}

    def _receive(self) -> None:
        """Wait up to :data:`POLL_S` for results or a worker's death, and take them in."""
        with self._lock:
            live = [w for w in self._workers if w is not None]
        if not live:
            if self._started.wait(POLL_S) and self._start_error is not None:
                raise ReaderProcessError(
                    f"the tile-reading processes could not be started ({type(self._start_error).__name__}: "
                    f"{self._start_error}); read tiles in this process with `--workers -1` or `--workers 0`."
                ) from self._start_error
            return
        waitables: dict[Any, _Worker] = {}
        for w in live:
            waitables[w.process.sentinel] = w
            if not w.eof:
                waitables[w.results] = w
        for ready in multiprocessing.connection.wait(list(waitables), timeout=POLL_S):
            w = waitables[ready]
            if ready is w.results:
                self._take(w)
        with self._lock:
            for w in live:
                if self._workers[w.slot] is w and not w.process.is_alive():
                    self._replace(w)

    def _take(self, w: _Worker) -> None:
        """One result from ``w``'s pipe (which is ready)."""
        try:
            message = w.results.recv()
        except EOFError:  # the worker is gone; its death is handled by the caller
            w.eof = True
            return
        except Exception as exc:  # a result lost on the way (its shared memory went with a dying worker):
            # without it the slide would wait for ever, so the worker is ended and its death handled
            logger.warning("lost a result of tile-reading process %s (%s: %s)", w.process.pid, type(exc).__name__, exc)
            w.eof = True
            w.process.kill()
            return
        job_id, seq, opens, payload = message
        with self._lock:
            w.outstanding.pop((job_id, seq), None)
            if opens:
                self.opens[(w.process.pid, self._paths.get(job_id, "?"))] += opens
            job = self._jobs.get(job_id)
            if job is not None and not job.cancelled and seq >= job.next_seq:
                if payload[0] == "batch":
                    job.results.setdefault(seq, (payload[1], payload[2]))
                else:
                    job.fail(seq, payload[1])
            self._dispatch()

    def _replace(self, w: _Worker) -> None:
        """``w`` died: fail the slide it was reading, start another worker, hand out again what it held (lock held)."""
        self._workers[w.slot] = None  # nothing more is handed to it
        while not w.eof and w.results.poll():  # what it sent before it died counts
            self._take(w)
        how = _how_it_ended(w.process.exitcode)
        victim: _Job | None = None
        for job_id, seq in w.outstanding:  # in the order it was to read them: it died on the first
            job = self._jobs.get(job_id)
            if job is None or job.cancelled or job is victim:
                continue
            if victim is None:
                victim = job
                first, last = job.batches[seq][0], job.batches[seq][-1]
                job.fail(seq, ReaderProcessError(
                    f"{job.source.path}: the tile-reading process (pid {w.process.pid}) {how} while it read tiles "
                    f"{first}-{last} of {len(job.coords)} (batch {seq + 1} of {len(job.batches)}). A crash in a "
                    "decoder points at a corrupt slide file: read it with the other backend (`--backend openslide` "
                    "or `tiffslide`), or in this process (`--workers 0`) to get an error instead of a crash; "
                    "SIGKILL is often the out-of-memory killer: use fewer `--workers` or a smaller `--batch-size`. "
                    "Rerun the command to retry the slide."
                ))  # fmt: skip
            else:
                job.requeue(seq)
        logger.warning(
            "tile-reading process %s %s%s; starting another", w.process.pid, how,
            f" while it read {Path(victim.source.path).name}" if victim is not None else "",
        )  # fmt: skip
        _discard(w)
        if not self._closed:
            self._workers[w.slot] = self._start_worker(w.slot)
        self._dispatch()

    # --- the end --------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the workers: each stops by itself when idle, the others are terminated; all are joined."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for job in self._jobs.values():
                job.cancelled = True
            self._jobs.clear()
        self._starter.join()
        with self._lock:
            workers = [w for w in self._workers if w is not None]
            self._workers = [None] * self.n_workers
        for w in workers:
            with contextlib.suppress(Exception):
                w.tasks.put(None)
        deadline = time.monotonic() + STOP_GRACE_S
        for w in workers:
            w.process.join(max(0.0, deadline - time.monotonic()))
        for w in workers:
            if w.process.is_alive():
                w.process.terminate()
        for w in workers:
            w.process.join(5)
            if w.process.is_alive():
                w.process.kill()
                w.process.join()
            _discard(w)

    def __enter__(self) -> ReaderPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SlideBatches:
    """One submitted slide's batches, in order (``tiles``, ``index``, ``ok`` as :class:`TileBatches` gives them).

    Errors of the slide's reads are raised where the failed batch would have come. :meth:`close` drops
    whatever of the slide is still to come.
    """

    def __init__(self, pool: ReaderPool, job: _Job) -> None:
        self._pool = pool
        self._job = job

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            batch = self._pool._next_batch(self._job)
            if batch is None:
                return
            yield batch

    def close(self) -> None:
        self._pool._cancel(self._job)


def _how_it_ended(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited (code {code})"


def _discard(w: _Worker) -> None:
    """Close the run's ends of a stopped worker's queue and pipe (never waiting on the queue's feeder)."""
    with contextlib.suppress(Exception):
        w.tasks.cancel_join_thread()
        w.tasks.close()
    with contextlib.suppress(Exception):
        w.results.close()


# --- in the worker process ------------------------------------------------------------------------------
def _worker_main(tasks: Any, results: Any, run_pid: int) -> None:
    """Read batches until told to stop, or until the run's process is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the run stops us
    torch.set_num_threads(1)
    parent = os.getppid()
    slides: OrderedDict[int, TileBatches] = OrderedDict()
    try:
        while True:
            try:
                message = tasks.get(timeout=POLL_S)
            except queue.Empty:
                if os.getppid() != parent or not _alive(run_pid):
                    return
                continue
            if message is None:
                return
            if message[0] == "close":
                dataset = slides.pop(message[1], None)
                if dataset is not None:
                    dataset.close()
                continue
            _, job_id, seq, source, coords = message
            dataset = slides.get(job_id)
            if dataset is None:
                dataset = slides[job_id] = TileBatches(source)
                while len(slides) > MAX_OPEN_SLIDES:
                    slides.popitem(last=False)[1].close()
            opens = dataset.n_opens
            try:
                tiles, ok = dataset.read_tiles(coords)
                payload: tuple[Any, ...] = ("batch", torch.from_numpy(tiles), ok)
            except Exception as exc:  # raised again where the run consumes this batch
                payload = ("error", _portable(exc))
            results.send((job_id, seq, dataset.n_opens - opens, payload))
    except (EOFError, OSError):  # the run's end of a queue or pipe is gone: so is the run
        return
    finally:
        for dataset in slides.values():
            dataset.close()
        with contextlib.suppress(OSError):
            results.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _portable(exc: Exception) -> Exception:
    """``exc`` if it survives pickling, else a :class:`SlideReadError` with its type and message."""
    try:
        pickle.loads(pickle.dumps(exc))  # noqa: S301 - our own exception, round-tripped in this process
    except Exception:
        return SlideReadError(f"{type(exc).__name__}: {exc}")
    return exc
