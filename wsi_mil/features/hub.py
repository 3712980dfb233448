"""Weights from the Hugging Face hub and from release URLs, checked before anything is fetched.

Hub files are looked up in the local cache first (``HF_HOME``/``HF_HUB_CACHE``, read at call time), so
a pre-downloaded cache works offline. When a file is not cached and the hub is offline
(``HF_HUB_OFFLINE=1``) or unreachable, one :class:`~wsi_mil.errors.WeightsError` naming the remedies is
raised at once, instead of the long retry loops of timm and huggingface_hub. A gated model (access
granted per user on its model page) without a token fails before any network call, with one message
saying how to get access (:func:`gated_access_message`). Release assets (``url`` presets) are cached
in torch's hub folder (``TORCH_HOME``), as ``torch.hub`` does.

:func:`resolve_preset_weights` fetches a preset's weight file; :func:`cached_preset_weights` only
looks (``wsi-mil encoders``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from wsi_mil.errors import WeightsError
from wsi_mil.features.presets import EncoderPreset
from wsi_mil.features.timm_import import import_timm
from wsi_mil.features.weights import WEIGHT_FILE_NAMES, weights_remedies

logger = logging.getLogger(__name__)

__all__ = [
    "HubWeights",
    "cached_preset_weights",
    "gated_access_message",
    "hf_token_present",
    "hub_is_offline",
    "resolve_hf_hub_file",
    "resolve_hf_hub_snapshot",
    "resolve_preset_weights",
    "resolve_timm_hub_weights",
]

_TRUE = {"1", "on", "yes", "true", "y", "t"}
_PROBE_TIMEOUT_S = 3.0
_HUB_ETAG_TIMEOUT_S = 10.0


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


def hf_token_present() -> bool:
    """Is a Hugging Face token configured (``HF_TOKEN``, or the token file ``hf auth login`` writes under
    ``HF_HOME``)? Read at call time; never calls the network."""
    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return True
    path = os.environ.get("HF_TOKEN_PATH")
    if not path:
        home = os.environ.get("HF_HOME") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
        )
        path = os.path.join(home, "token")
    try:
        return bool(Path(path).read_text(encoding="utf-8").strip())
    except OSError:
        return False


def gated_access_message(name: str, repo: str, page: str, reason: str) -> str:
    """The one message of a gated model whose weights cannot be fetched: why, and how to get them."""
    return (
        f"Encoder {name!r} needs the weights of the gated model {repo}, and {reason}. To get them: (1) request "
        f"access on {page} (signed in to Hugging Face; access is granted per account); (2) once granted, log "
        "in on this machine (`hf auth login`, or set HF_TOKEN) and rerun: the weights download into "
        "HF_HOME; without internet here, download them on a machine that has it "
        f"(`hf download {repo}`) into a shared HF_HOME and rerun with that HF_HOME and HF_HUB_OFFLINE=1; "
        "(3) or pass the weight file, or the downloaded snapshot folder, with --weights PATH."
    )


def _is_access_denied(exc: Exception) -> bool:
    """A gated or private repo refused our token (or its absence)."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(exc, (GatedRepoError, RepositoryNotFoundError)):
        return True
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return status in (401, 403)


def resolve_hf_hub_file(
    repo_id: str,
    filenames: Iterable[str],
    *,
    what: str,
    name: str,
    hub_name: str | None = None,
    gated_page: str | None = None,
) -> Path:
    """The first of ``filenames`` found for ``repo_id``: from the local cache, else downloaded.

    Never calls the hub when offline or unreachable, nor for a gated repo (``gated_page`` given) without a
    token: raises :class:`WeightsError` with the remedies (for a gated repo, how to get access) at once.
    """
    names = list(filenames)
    hit = _cached_hf_file(repo_id, names)
    if hit is not None:
        logger.info("Using cached %s of %s: %s", what, repo_id, hit)
        return hit
    from huggingface_hub import constants

    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    cache = _hf_cache_dir()
    fetch = f"hf download {repo_id}"
    missing = f"No {what} for encoder {name!r} in the local Hugging Face cache ({cache}, repo {repo_id})"
    not_cached = f"they are not in the local Hugging Face cache ({cache})"
    if gated_page is not None and not hf_token_present():
        reason = f"{not_cached} and no Hugging Face token is set (HF_TOKEN, or `hf auth login`)"
        raise WeightsError(gated_access_message(name, repo_id, gated_page, reason))
    if hub_is_offline():
        if gated_page is not None:
            reason = f"{not_cached} and the hub is offline (HF_HUB_OFFLINE=1)"
            raise WeightsError(gated_access_message(name, repo_id, gated_page, reason))
        raise WeightsError(f"{missing} and the hub is offline (HF_HUB_OFFLINE=1). {weights_remedies(name, hub_name, fetch=fetch)}")
    if not _network_ok(endpoint):
        if gated_page is not None:
            reason = f"{not_cached} and the hub ({endpoint}) cannot be reached from this machine"
            raise WeightsError(gated_access_message(name, repo_id, gated_page, reason))
        raise WeightsError(
            f"{missing} and the hub ({endpoint}) cannot be reached from this machine. "
            f"{weights_remedies(name, hub_name, fetch=fetch)}"
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
            if gated_page is not None and _is_access_denied(e):
                reason = f"the hub refused the token configured here ({type(e).__name__})"
                raise WeightsError(gated_access_message(name, repo_id, gated_page, reason)) from e
            raise WeightsError(
                f"Could not download {what} for encoder {name!r} from the hub ({repo_id}/{fn}): "
                f"{type(e).__name__}: {e}. {weights_remedies(name, hub_name, fetch=fetch)}"
            ) from e
    raise WeightsError(
        f"The hub repo {repo_id} has none of {names} ({last}). {weights_remedies(name, hub_name, fetch=fetch)}"
    )


def resolve_hf_hub_snapshot(repo: str, name: str, need_weights: bool) -> tuple[Path, Path | None]:
    """Snapshot folder of a timm model on the hub (config.json, and the weight file when needed)."""
    config = resolve_hf_hub_file(repo, ["config.json"], what="model config (config.json)", name=name, hub_name=name)
    weights = None
    if need_weights:
        weights = resolve_hf_hub_file(repo, WEIGHT_FILE_NAMES, what="weights", name=name, hub_name=name)
        if weights.parent != config.parent:
            raise WeightsError(
                f"The cached config and weights of {repo} belong to different revisions "
                f"({config.parent.name} vs {weights.parent.name}); re-download the repo."
            )
    return config.parent, weights


# --- release assets (torch.hub's cache) -------------------------------------------------------------------
def _torch_hub_dir() -> Path:
    """torch.hub's folder without importing torch: ``TORCH_HOME``/hub, else ``XDG_CACHE_HOME``/torch/hub."""
    home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch"
    )
    return Path(home) / "hub"


def url_cache_path(url: str) -> Path:
    """Where torch.hub keeps a downloaded release asset."""
    return _torch_hub_dir() / "checkpoints" / os.path.basename(urllib.parse.urlsplit(url).path)


def resolve_url_file(url: str, *, name: str, hub_name: str | None = None) -> Path:
    """A release asset from torch.hub's cache, else downloaded (never when offline or unreachable)."""
    cached = url_cache_path(url)
    if cached.is_file():
        return cached
    fetch = f"python -c \"import torch; torch.hub.load_state_dict_from_url('{url}')\""
    if hub_is_offline() or not _network_ok(url):
        raise WeightsError(
            f"Weights for encoder {name!r} are not cached ({cached}) and {url} cannot be reached "
            f"(offline or no network). {weights_remedies(name, hub_name, fetch=fetch).replace('HF_HOME', 'TORCH_HOME')}"
        )
    import torch

    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(cached), progress=False)
    except Exception as e:
        raise WeightsError(
            f"Could not download weights for {name!r} from {url}: {e}. {weights_remedies(name, hub_name, fetch=fetch)}"
        ) from e
    return cached


def resolve_timm_hub_weights(timm_name: str, *, name: str | None = None) -> HubWeights:
    """Resolve the pretrained weight file of a timm model id (``arch`` or ``arch.tag``) to a local path.

    Uses timm's pretrained config (``hf_hub_id``, else the legacy ``url`` in torch's hub cache).
    """
    import_timm()  # first: timm without torch._dynamo (timm_import)
    import timm.models

    label = name or timm_name
    cfg = timm.models.get_pretrained_cfg(timm_name)
    if cfg is None:
        raise WeightsError(
            f"timm has no pretrained weights registered for {timm_name!r}. {weights_remedies(label, timm_name)}"
        )
    arch = timm_name.split(".", 1)[0]
    tag = f"{arch}.{cfg.tag}" if cfg.tag else arch
    if cfg.hf_hub_id:
        primary = cfg.hf_hub_filename or "pytorch_model.bin"
        candidates: list[str] = []
        if primary.endswith(".bin"):
            candidates.append("model.safetensors" if primary == "pytorch_model.bin" else primary[:-4] + ".safetensors")
        candidates.append(primary)
        path = resolve_hf_hub_file(cfg.hf_hub_id, candidates, what="weights", name=label, hub_name=tag)
        return HubWeights(path=path, tag=tag)
    if isinstance(cfg.url, str) and cfg.url:
        return HubWeights(path=resolve_url_file(cfg.url, name=label, hub_name=timm_name), tag=tag)
    raise WeightsError(f"timm lists no download location for {timm_name!r}. {weights_remedies(label, timm_name)}")


# --- presets --------------------------------------------------------------------------------------------
def resolve_preset_weights(preset: EncoderPreset) -> HubWeights:
    """The default weight file of a preset with a download source (``hub``, ``url`` or ``timm``):
    from the cache, else fetched; gated models without access fail at once (see the module docstring)."""
    src = preset.weights
    if src.kind == "hub" and src.location:
        path = resolve_hf_hub_file(
            src.location, src.files, what="weights", name=preset.name, gated_page=src.page if src.gated else None
        )
        return HubWeights(path=path, tag=src.location)
    if src.kind == "url" and src.location:
        return HubWeights(path=resolve_url_file(src.location, name=preset.name), tag=src.location)
    if src.kind == "timm" and src.location:
        return resolve_timm_hub_weights(src.location, name=preset.name)
    raise WeightsError(
        f"Encoder {preset.name!r} has no download source: its weights come from a file only ({src.page}). "
        "Download them as that page says and pass --weights PATH."
    )


def cached_preset_weights(preset: EncoderPreset) -> Path | None:
    """The preset's default weight file if it is on this machine already (no network, no download)."""
    src = preset.weights
    if src.kind == "hub" and src.location:
        return _cached_hf_file(src.location, src.files)
    if src.kind == "url" and src.location:
        path = url_cache_path(src.location)
        return path if path.is_file() else None
    if src.kind == "timm" and src.location:  # timm publishes its weights as timm/<tag> (no timm import here)
        return _cached_hf_file(f"timm/{src.location}", WEIGHT_FILE_NAMES)
    if src.kind == "package":
        from wsi_mil.features.weights import efficientnet_lite0_package_file

        try:
            return efficientnet_lite0_package_file()
        except WeightsError:
            return None
    return None
