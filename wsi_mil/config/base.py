"""One validated configuration per command (unknown keys rejected), written next to its outputs.

Each command has a pydantic model with ``extra="forbid"`` and bounded fields; the defaults live in
``configs/<command>.yaml`` (also shipped in the package) and equal the model defaults. Values come
from, in order of precedence: command-line flags, the YAML file given with ``--config``, defaults.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from wsi_mil.errors import ConfigError
from wsi_mil.store import atomic_write_text

C = TypeVar("C", bound="StrictModel")


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping in a YAML config file (not validated)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"Config file {p} does not exist.")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"Config file {p} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {p} must hold a mapping of keys, not {type(data).__name__}.")
    return data


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(
    model: type[C], path: str | os.PathLike[str] | None = None, overrides: dict[str, Any] | None = None
) -> C:
    """Validate ``path`` (YAML) merged with ``overrides`` (dotted keys allowed, ``None`` values ignored)."""
    data = read_yaml(path) if path is not None else {}
    nested: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return validate_config(model, _deep_merge(data, nested), path)


def validate_config(model: type[C], data: dict[str, Any], path: str | os.PathLike[str] | None = None) -> C:
    """``model`` validated from ``data``; a :class:`ConfigError` names every unknown key and bad value."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err["loc"])
            cause = err.get("ctx", {}).get("error")
            if err["type"] == "extra_forbidden":
                problems.append(f"unknown key '{loc}'")
            elif isinstance(cause, ConfigError):  # a check across keys: its message names them
                problems.append(f"'{loc}': {cause}" if loc else str(cause))
            else:
                problems.append(f"'{loc}': {err['msg']}")
        where = f" in {path}" if path is not None else ""
        allowed = ", ".join(model.model_fields)
        text = "; ".join(problems)
        raise ConfigError(
            f"Invalid {model.__name__}{where}: {text}{'' if text.endswith('.') else '.'} Top-level keys allowed: {allowed}."
        ) from exc


def config_hash(config: StrictModel, fields: tuple[str, ...] | None = None) -> str:
    """Stable short hash of the fields that change outputs."""
    data = config.model_dump(mode="json")
    if fields is not None:
        data = {k: data[k] for k in fields}
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def dump_config(config: StrictModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def write_config(config: StrictModel, path: str | os.PathLike[str]) -> Path:
    return atomic_write_text(path, dump_config(config))
