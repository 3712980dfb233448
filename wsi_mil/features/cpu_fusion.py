"""A CNN encoder's convolutions fused with their batch norm, ReLU and residual add, for CPU inference.

On the CPU, a ResNet's forward under eager PyTorch is convolutions (oneDNN) plus separate passes over
every activation for batch norm, ReLU and the residual add, and under bf16 autocast a cast of every
weight on every call. :func:`fuse_for_cpu` removes those passes, as ``torch.compile``'s CPU backend does
with freezing, but without dynamo's import and a compile per process: it traces the frozen model with
``torch.fx``, folds each batch norm into the convolution before it (``torch.nn.utils.fusion``), and
replaces each convolution, with the ReLU and residual add that follow it, by one call of oneDNN's fused
convolution (``torch.ops.mkldnn._convolution_pointwise``, the kernel inductor's CPU backend emits) whose
weights are cast to the run's precision and reordered into oneDNN's layout once, at build time (0.13 s
for ``resnet50_trunc``).

Measured on 2 CPU cores (README, "Measured performance"): ``resnet50_trunc`` (CLAM's encoder) in bf16
encodes 1.15x the tiles per second of the eager model inside a whole slide (``clam_compare.py``'s slide,
interleaved runs), and its convolutions then run about as fast as this CPU multiplies large bf16
matrices.

The features change only by rounding (a folded batch norm is rounded once, with the weights): the fused
model is checked against the eager one on a test input when it is built, and is not used when they
disagree. It is only built where it fuses something: a model torch.fx cannot trace or with no batch norm to
fold (EfficientNet-Lite0, which is both; the transformers) keeps its eager forward, and so its
features exactly. Feature files do not record the fusion, as they do not record the batch size: both
change the features by rounding only.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: the least cosine similarity of a fused model's features to the eager float32 ones on the build-time
#: check (bf16 rounding alone gives about 0.99999 on resnet50_trunc)
MIN_COSINE = 0.999

_ADDS = (operator.add, operator.iadd, torch.add)
_RELUS = (torch.relu, torch.nn.functional.relu)


class FusedConv(nn.Module):
    """A convolution (its batch norm folded in) with an optional residual add and ReLU, in one oneDNN call."""

    def __init__(
        self, conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool, add: bool,
        dtype: torch.dtype, input_size: list[int],
    ) -> None:  # fmt: skip
        """``conv`` gives the geometry; ``weight`` and ``bias`` are its own or those with a batch norm folded in."""
        super().__init__()
        self.padding = [int(p) for p in conv.padding]
        self.stride = [int(s) for s in conv.stride]
        self.dilation = [int(d) for d in conv.dilation]
        self.groups = int(conv.groups)
        self.relu, self.add = relu, add
        packed = torch.ops.mkldnn._reorder_convolution_weight(
            weight.detach().to(dtype), self.padding, self.stride, self.dilation, self.groups, input_size
        )
        self.register_buffer("weight", packed)
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        if self.add:
            out: torch.Tensor = torch.ops.mkldnn._convolution_pointwise.binary(
                x, other, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups,
                "add", 1.0, "relu" if self.relu else None, [], None,
            )  # fmt: skip
            return out
        out = torch.ops.mkldnn._convolution_pointwise(
            x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups,
            "relu" if self.relu else "none", [], "",
        )  # fmt: skip
        return out


class CpuFusedModel(nn.Module):
    """The fused graph, fed in its precision (the output is in that precision too: callers take ``.float()``)."""

    def __init__(self, graph: nn.Module, dtype: torch.dtype, n_fused: int, n_folded: int) -> None:
        super().__init__()
        self.graph, self.dtype = graph, dtype
        self.n_fused, self.n_folded = n_fused, n_folded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.graph(x.to(self.dtype))
        return out


def available(dtype: torch.dtype) -> bool:
    """Whether this PyTorch build and CPU have oneDNN's fused convolution at ``dtype``."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")):
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))


def _is(node: Any, modules: dict[str, nn.Module], kind: type[nn.Module]) -> bool:
    """``node`` calls a module of exactly ``kind``: subclasses (timm's ``Conv2dSame``, ``BatchNormAct2d``)
    compute more than their base class, so they are left as they are."""
    return bool(node.op == "call_module" and type(modules.get(node.target)) is kind)


def _is_relu(node: Any, modules: dict[str, nn.Module]) -> bool:
    return (
        _is(node, modules, nn.ReLU)
        or (node.op == "call_function" and node.target in _RELUS)
        or (node.op == "call_method" and node.target in ("relu", "relu_"))
    )


def fused_or_model(
    model: nn.Module, name: str, precision: str, input_size: tuple[int, int, int], batch_size: int
) -> nn.Module:
    """:func:`fuse_for_cpu` at ``precision`` (fp32 or bf16) where it fuses, else ``model`` itself."""
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    fused = fuse_for_cpu(model, dtypes[precision], input_size, batch_size) if precision in dtypes else None
    if fused is None:
        return model
    logger.info(
        "encoder %s fused for the CPU: %d convolutions with %d batch norms folded (cpu_fusion: false runs it "
        "as it is)", name, fused.n_fused, fused.n_folded,
    )  # fmt: skip
    return fused


def fuse_for_cpu(
    model: nn.Module, dtype: torch.dtype, input_size: tuple[int, int, int], batch_size: int
) -> CpuFusedModel | None:
    """The fused model, or ``None`` where nothing is fused or it cannot be (then use ``model`` as it is).

    Args:
        model: the frozen encoder, in eval mode, on the CPU (it is not changed).
        dtype: ``torch.float32`` or ``torch.bfloat16``: the weights' and activations' precision.
        input_size: ``(channels, height, width)`` of the transformed tiles.
        batch_size: the batch the weights' layout is chosen for (other batch sizes work too).
    """
    if not available(dtype) or model.training or not any(type(m) is nn.BatchNorm2d for m in model.modules()):
        return None  # nothing to fold (timm's BatchNormAct2d, as in Lite0, is not folded): no trace at all
    example = torch.randn(1, *input_size, generator=torch.Generator().manual_seed(0))
    example = example.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        try:  # a traced view of the model: it shares the model's modules and changes none of them
            gm = torch.fx.symbolic_trace(model)
        except Exception as exc:  # noqa: BLE001 - a model fx cannot trace keeps its eager forward
            logger.debug("not fused for the CPU: torch.fx cannot trace %s (%s)", type(model).__name__, exc)
            return None
        modules = dict(gm.named_modules())
        for node in list(gm.graph.nodes):
            if _is(node, modules, nn.Identity):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
        gm.recompile()
        expected = _Shapes(gm).run(example)
        n_fused, n_folded = _fuse_convolutions(gm, modules, dtype, batch_size)
        if n_folded == 0:
            return None
        fused = CpuFusedModel(gm, dtype, n_fused, n_folded)
        got = fused(example).float()
    cosine = float(torch.nn.functional.cosine_similarity(got.flatten(1), expected.float().flatten(1)).min())
    if not cosine >= MIN_COSINE:
        logger.warning(
            "the CPU-fused %s disagrees with its eager forward (cosine %.5f < %s): using the eager one",
            type(model).__name__, cosine, MIN_COSINE,
        )  # fmt: skip
        return None
    logger.debug("fused for the CPU: %d convolutions, %d batch norms folded, cosine %.6f", n_fused, n_folded, cosine)
    return fused


class _Shapes(torch.fx.Interpreter):
    """Runs the graph, recording each tensor's shape in ``node.meta["shape"]`` (torch.fx's ``ShapeProp``
    does the same but imports sympy, a third of a second of every start-up)."""

    def run_node(self, n: Any) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            n.meta["shape"] = tuple(out.shape)
        return out


def _sole_user(node: Any) -> Any:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _fuse_convolutions(gm: Any, modules: dict[str, nn.Module], dtype: torch.dtype, batch_size: int) -> tuple[int, int]:
    """Replace each Conv2d, with the batch norm, add and ReLU that follow it, by a :class:`FusedConv`.

    Returns how many convolutions were replaced and how many batch norms folded into them."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    graph = gm.graph
    convolutions = [n for n in graph.nodes if _is(n, modules, nn.Conv2d)]
    shapes = {n: list(n.args[0].meta["shape"]) for n in convolutions}  # before nodes are replaced
    n_fused = n_folded = 0
    for node in convolutions:
        conv = modules[node.target]
        assert isinstance(conv, nn.Conv2d)
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            continue
        chain, user = [node], _sole_user(node)
        weight, bias = conv.weight, conv.bias
        norm = modules.get(user.target) if user is not None and user.op == "call_module" else None
        if type(norm) is nn.BatchNorm2d and norm.running_mean is not None and norm.running_var is not None:
            weight, bias = fuse_conv_bn_weights(
                conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias
            )
            n_folded += 1
            chain.append(user)
            user = _sole_user(user)
        other = None
        if user is not None and user.op == "call_function" and user.target in _ADDS and len(user.args) == 2 \
                and not user.kwargs:  # fmt: skip
            candidate = user.args[1] if user.args[0] is chain[-1] else user.args[0]
            shape = getattr(candidate, "meta", {}).get("shape")
            if candidate is not chain[-1] and shape is not None and shape == chain[-1].meta["shape"]:
                other = candidate
                chain.append(user)
                user = _sole_user(user)
        relu = user is not None and _is_relu(user, modules)
        if relu:
            chain.append(user)
        name = f"fused_conv_{n_fused}"
        gm.add_submodule(name, FusedConv(conv, weight, bias, relu, other is not None, dtype, [batch_size, *shapes[node][1:]]))
        with graph.inserting_after(chain[-1]):
            new = graph.call_module(name, (node.args[0],) if other is None else (node.args[0], other))
        new.meta = dict(chain[-1].meta)  # its shape, for a later convolution's residual add
        chain[-1].replace_all_uses_with(new)
        for old in reversed(chain):
            graph.erase_node(old)
        n_fused += 1
    graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return n_fused, n_folded
