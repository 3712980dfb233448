"""A bounded, thread-safe cache of open slide handles, shared by the viewer's request threads.

At most ``max_slides`` slides are open at once (least recently used closed first), each with at most
``handles_per_slide`` handles. A request borrows one handle for the duration of one read and gives it
back, so no handle is used by two threads at a time (the backends' handles keep per-handle state),
while up to ``handles_per_slide`` requests read one slide in parallel. A request that finds all
handles of its slide borrowed waits for one. Handles of a slide pushed out of the cache while borrowed
are closed when they come back. Open handles therefore never exceed ``max_slides x handles_per_slide``
plus the handles of pushed-out slides still in use, whatever a client asks for.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from wsi_mil.slide import Slide

logger = logging.getLogger(__name__)

__all__ = ["SlideCache"]


@dataclass
class _Entry:
    idle: list[Slide] = field(default_factory=list)
    open_count: int = 0
    retired: bool = False


class SlideCache:
    """Open slides by key through ``opener``; see the module docstring."""

    def __init__(self, opener: Callable[[str], Slide], *, max_slides: int = 8, handles_per_slide: int = 4) -> None:
        if max_slides < 1 or handles_per_slide < 1:
            raise ValueError("max_slides and handles_per_slide must be at least 1")
        self._opener = opener
        self.max_slides = max_slides
        self.handles_per_slide = handles_per_slide
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._cond = threading.Condition()
        self._closed = False
        #: handles opened so far (for tests and the benchmark)
        self.opened = 0

    @property
    def open_handles(self) -> int:
        with self._cond:
            return sum(e.open_count for e in self._entries.values())

    def _entry(self, key: str) -> _Entry:
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry()
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_slides:
            old_key, old = self._entries.popitem(last=False)
            old.retired = True
            for slide in old.idle:
                _close(slide)
            old.open_count -= len(old.idle)
            old.idle.clear()
            logger.debug("slide cache: closed %s (least recently used)", old_key)
        return entry

    @contextmanager
    def borrow(self, key: str) -> Iterator[Slide]:
        """A handle of slide ``key`` for one read; the opener's errors pass through."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the slide cache is closed")
            entry = self._entry(key)
            while not entry.idle and entry.open_count >= self.handles_per_slide:
                self._cond.wait(timeout=1.0)
                if entry.retired:  # pushed out while waiting: start over with a fresh entry
                    entry = self._entry(key)
            slide = entry.idle.pop() if entry.idle else None
            if slide is None:
                entry.open_count += 1
        if slide is None:
            try:
                slide = self._opener(key)
            except BaseException:
                with self._cond:
                    entry.open_count -= 1
                    self._cond.notify_all()
                raise
            with self._cond:
                self.opened += 1
        try:
            yield slide
        finally:
            with self._cond:
                if entry.retired or self._closed:
                    entry.open_count -= 1
                    _close(slide)
                else:
                    entry.idle.append(slide)
                self._cond.notify_all()

    def forget(self, key: str) -> None:
        """Close the idle handles of ``key`` (its file changed or disappeared); borrowed ones close on return."""
        with self._cond:
            entry = self._entries.pop(key, None)
            if entry is None:
                return
            entry.retired = True
            for slide in entry.idle:
                _close(slide)
            entry.open_count -= len(entry.idle)
            entry.idle.clear()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for key in list(self._entries):
                self.forget(key)


def _close(slide: Slide) -> None:
    try:
        slide.close()
    except Exception as exc:  # closing must not fail a request
        logger.debug("closing %s failed: %s", slide.path, exc)
