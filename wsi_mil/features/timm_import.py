"""``import_timm()``: timm, imported without paying for ``torch._dynamo`` at start-up.

``import timm`` imports ``torch._dynamo`` (about 1 s of the 2 s that ``import timm`` costs on a 2-core CPU,
on every ``wsi-mil extract``) through two lines that no encoder here needs at import time:

* ``torchvision.ops.roi_align`` does ``from torch._dynamo.utils import is_compile_supported``;
* ``timm.layers.typing`` binds ``torch.compiler.disable``, and timm's NaFlexViT decorates methods with it
  while its module is imported (``torch.compiler.disable`` imports ``torch._dynamo`` on each call).

While timm imports, ``import_timm`` puts a stand-in ``torch._dynamo.utils`` in ``sys.modules`` (its
``is_compile_supported`` imports the real module on its first call; any other name asked of it imports the
real module at once) and a lazy ``torch.compiler.disable`` (it wraps the function and applies the real
``torch._dynamo.disable`` on the wrapped function's first call, so eager calls behave the same and a compiled
model still skips it). Both are undone as soon as timm has imported: ``torch.compile`` and any later
``import torch._dynamo`` get the real thing. Nothing changes when ``torch._dynamo`` is already imported.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["import_timm"]

_UTILS = "torch._dynamo.utils"


def import_timm() -> types.ModuleType:
    """``import timm`` (once per process) without importing ``torch._dynamo``; returns the module."""
    if "timm" not in sys.modules:
        with _dynamo_utils_deferred():
            import timm  # noqa: F401
    return sys.modules["timm"]


@contextlib.contextmanager
def _dynamo_utils_deferred() -> Iterator[None]:
    if "torch._dynamo" in sys.modules or _UTILS in sys.modules:
        yield
        return
    stand_in = types.ModuleType(_UTILS, "a stand-in while timm imports (wsi_mil.features.timm_import)")

    def remove() -> None:
        if sys.modules.get(_UTILS) is stand_in:
            del sys.modules[_UTILS]

    def real() -> types.ModuleType:
        remove()
        return importlib.import_module(_UTILS)

    def is_compile_supported(device_type: Any) -> Any:
        return real().is_compile_supported(device_type)

    def __getattr__(name: str) -> Any:  # PEP 562: any other name is the real module's, imported now
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(real(), name)

    stand_in.is_compile_supported = is_compile_supported  # type: ignore[attr-defined]
    stand_in.__getattr__ = __getattr__  # type: ignore[method-assign]
    import torch.compiler

    original_disable = torch.compiler.disable
    sys.modules[_UTILS] = stand_in
    torch.compiler.disable = _lazy_disable(original_disable)  # type: ignore[assignment]
    try:
        yield
    finally:
        remove()
        torch.compiler.disable = original_disable  # type: ignore[assignment]


def _lazy_disable(disable: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compiler.disable`` with the same signature, applied on the decorated function's first call."""

    def lazy(fn: Callable[..., Any] | None = None, recursive: bool = True, **kwargs: Any) -> Any:
        if fn is None:
            return lambda f: lazy(f, recursive, **kwargs)
        resolved: list[Callable[..., Any]] = []

        @functools.wraps(fn)
        def wrapper(*args: Any, **kw: Any) -> Any:
            if not resolved:
                resolved.append(disable(fn, recursive, **kwargs))
            return resolved[0](*args, **kw)

        return wrapper

    return lazy
