"""Which slide file an output is about: a cheap fingerprint, recorded in every output and checked on use.

Two slides can share an id (the file name without extension) in different cohorts, or a slide can be
re-scanned under the same name. Every bag, score and heatmap file records the fingerprint of the slide
it came from, and each stage that pairs an output with a slide compares them and refuses a mismatch,
naming both files (``--ignore-slide-identity`` turns the refusal into a warning, for a re-scanned slide
whose tiles still fit).

The fingerprint is the slide's level-0 size, its µm/px, the file size and the SHA-256 of the file's first
and last MiB (header and tail: the tile offsets and the last tiles). It costs two 1 MiB reads, not a
hash of a multi-GB file; files that differ only in the middle MiBs (an edited tile) compare equal.

Within one run a cheaper identity suffices: :class:`FileStamp` (size, modification time, inode and device
from one ``stat``) tells a process that a file is still the one another process of the run checked.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

__all__ = ["HEAD_TAIL_BYTES", "FileStamp", "SlideFingerprint", "fingerprint_file"]

HEAD_TAIL_BYTES = 1 << 20
_MPP_REL_TOL = 1e-6


class FileStamp(NamedTuple):
    """A file's identity from one ``stat``: equal stamps mean the file was neither rewritten nor replaced
    (a copy or ``mv`` over it changes the modification time or the inode)."""

    size_bytes: int
    mtime_ns: int
    inode: int
    device: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileStamp:
        return cls(int(st.st_size), int(st.st_mtime_ns), int(st.st_ino), int(st.st_dev))


def _head_tail_sha256(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        digest.update(fh.read(HEAD_TAIL_BYTES))
        if size > HEAD_TAIL_BYTES:
            fh.seek(max(HEAD_TAIL_BYTES, size - HEAD_TAIL_BYTES))
            digest.update(fh.read(HEAD_TAIL_BYTES))
    return digest.hexdigest()


@dataclass(frozen=True)
class SlideFingerprint:
    """What identifies one slide file (see the module docstring)."""

    width_px: int
    height_px: int
    mpp: float
    file_bytes: int
    head_tail_sha256: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes | None) -> SlideFingerprint | None:
        """The fingerprint stored in an output, or ``None`` when the output has none (older files)."""
        if not text:
            return None
        data: dict[str, Any] = json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
        return cls(
            width_px=int(data["width_px"]), height_px=int(data["height_px"]), mpp=float(data["mpp"]),
            file_bytes=int(data["file_bytes"]), head_tail_sha256=str(data["head_tail_sha256"]),
        )

    def differences(self, other: SlideFingerprint) -> list[str]:
        """What differs between two fingerprints, in words (empty when they are the same slide)."""
        out = []
        if (self.width_px, self.height_px) != (other.width_px, other.height_px):
            out.append(f"level 0 {self.width_px} x {self.height_px} vs {other.width_px} x {other.height_px} px")
        if abs(self.mpp - other.mpp) > _MPP_REL_TOL * max(self.mpp, other.mpp):
            out.append(f"{self.mpp:.6g} vs {other.mpp:.6g} µm/px")
        if self.file_bytes != other.file_bytes:
            out.append(f"{self.file_bytes:,} vs {other.file_bytes:,} bytes")
        if self.head_tail_sha256 != other.head_tail_sha256:
            out.append(f"first/last MiB sha256 {self.head_tail_sha256[:12]}… vs {other.head_tail_sha256[:12]}…")
        return out


def fingerprint_file(path: str | os.PathLike[str], width_px: int, height_px: int, mpp: float) -> SlideFingerprint:
    """The fingerprint of the slide file at ``path`` opened with level-0 ``width_px x height_px`` at ``mpp``."""
    p = Path(path)
    size = p.stat().st_size
    return SlideFingerprint(
        width_px=int(width_px), height_px=int(height_px), mpp=float(mpp), file_bytes=size,
        head_tail_sha256=_head_tail_sha256(p, size),
    )
