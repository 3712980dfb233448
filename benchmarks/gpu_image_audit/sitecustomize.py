"""An import audit that makes this machine's Python behave like a lent GPU machine's, for gpu_check.sh's CPU mode.

With this folder on ``PYTHONPATH`` every Python process (children too) refuses to import a package whose
distribution is neither in that machine's image (``_wheels.IMAGE_PACKAGES``) nor carried in ``.whl/``, and
takes the carried ones only from ``$AUDIT_SITE`` (where gpu_check.sh installed the wheels), never from this
machine's own environment. Each refusal and each import from the site folder is a line of
``$AUDIT_LOG`` (default ``/tmp/wsi_mil_gpu_image_audit.log``). Versions are this environment's, not the
image's. Here the wheels must be built for this Python (``gpu_wheels.sh`` fetches CPython 3.12 ones), e.g.
a ``python3`` on ``PATH`` that runs ``.venv/bin/python``, ``.whl/`` with this Python's builds of the same
versions, then::

    PYTHONPATH=$PWD/benchmarks/gpu_image_audit AUDIT_SITE=/tmp/site GPU_CHECK_SITE=/tmp/site \\
        GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.metadata
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
try:
    import _wheels
finally:
    sys.path.pop(0)

_canon = _wheels.canonicalize_name
CARRIED = {_canon(n) for n in [*_wheels.BUNDLE, *_wheels.DATA_PACKAGES]}
#: httpx2, httpcore2: what huggingface_hub 2.x (constraints.txt) imports; the image's 1.33 imports httpx
ALLOWED = {"wsi-mil", "httpx2", "httpcore2"} | set(_wheels.IMAGE_PACKAGES)
SITE = os.environ.get("AUDIT_SITE", "")
LOG = os.environ.get("AUDIT_LOG", "/tmp/wsi_mil_gpu_image_audit.log")
_DISTS = importlib.metadata.packages_distributions()


def _log(message: str) -> None:
    with open(LOG, "a") as fh:
        fh.write(f"{os.getpid()} {message}\n")


class ImageAudit(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if "." in name:  # submodules come from where their package came from
            return None
        dists = {_canon(d) for d in _DISTS.get(name, ())}
        if not dists:  # the standard library, or this source tree
            return None
        if dists & CARRIED and SITE:
            spec = importlib.machinery.PathFinder.find_spec(name, [SITE])
            if spec is None:
                _log(f"refused {name} ({', '.join(sorted(dists))}): not in {SITE}")
                raise ImportError(f"image audit: {name} is carried but not installed in {SITE}")
            _log(f"site {name}")
            return spec
        if not dists & (ALLOWED | CARRIED):
            _log(f"refused {name} ({', '.join(sorted(dists))})")
            raise ImportError(f"image audit: {name} ({', '.join(sorted(dists))}) is neither in the GPU image nor carried")
        return None


sys.meta_path.insert(0, ImageAudit())
