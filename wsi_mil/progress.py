"""Progress bars that switch themselves off when stderr is not a terminal (batch jobs, CI, logs)."""

from __future__ import annotations

import sys
from typing import Any


def progress_bar(total: int | None = None, desc: str = "", unit: str = "it", enable: bool | None = None, **kw: Any) -> Any:
    """A tqdm bar; ``enable=None`` shows it only on a TTY."""
    from tqdm.auto import tqdm

    if enable is None:
        enable = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, disable=not enable, leave=False, dynamic_ncols=True, **kw)
