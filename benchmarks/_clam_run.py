"""Run one of CLAM's own scripts from a CLAM checkout, with random encoder weights and time marks.

    python benchmarks/_clam_run.py CLAM_DIR create_patches_fp.py --source ... --seg --patch
    python benchmarks/_clam_run.py CLAM_DIR extract_features_fp.py --data_h5_dir ... --model_name resnet50_trunc

CLAM (GPL-3.0) is not copied here: its script runs as ``__main__`` (``runpy``) with its folder first on
``sys.path``, as ``python CLAM_DIR/SCRIPT ...`` would run it. Two things are changed from outside:

* CLAM's ``resnet50_trunc`` is ``timm.create_model("resnet50.tv_in1k", features_only=True,
  out_indices=(3,), pretrained=True)`` (``models/timm_wrapper.py``), whose weights come from the Hugging
  Face hub and cannot download here. ``timm.create_model`` is wrapped to build the same network with
  ``pretrained=False``: random weights (torch seed 0), as ``wsi-mil extract --random-init`` uses.
* ``models.get_encoder`` is wrapped to note when it starts and ends, so the parent can split CLAM's
  start-up into imports and model building.

The marks (``time.time()`` values) go to stderr as one line ``CLAM_MARKS {json}`` when the script ends.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import time
from typing import Any

MARK_PREFIX = "CLAM_MARKS "


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit("usage: _clam_run.py CLAM_DIR SCRIPT [ARGS...]")
    clam_dir, script = os.path.abspath(argv[0]), argv[1]
    marks: dict[str, Any] = {"wrapper_start": time.time(), "random_init": False}
    sys.path[0] = clam_dir  # instead of benchmarks/, as `python CLAM_DIR/SCRIPT` would have it
    if script.startswith("extract_features"):
        import timm
        import torch

        create = timm.create_model

        def create_model(name: str, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("pretrained"):
                kwargs["pretrained"] = False
                marks["random_init"] = True
                torch.manual_seed(0)
            return create(name, *args, **kwargs)

        timm.create_model = create_model
        import models  # CLAM's models/ package

        get_encoder = models.get_encoder

        def timed_get_encoder(*args: Any, **kwargs: Any) -> Any:
            marks.setdefault("encoder_start", time.time())
            out = get_encoder(*args, **kwargs)
            marks.setdefault("encoder_end", time.time())
            return out

        models.get_encoder = timed_get_encoder  # the script's `from models import get_encoder` takes this one
    marks["script_start"] = time.time()
    sys.argv = [os.path.join(clam_dir, script), *argv[2:]]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
        marks["script_end"] = time.time()
        print(MARK_PREFIX + json.dumps(marks), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
