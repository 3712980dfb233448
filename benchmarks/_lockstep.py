"""Train R independent replicas of one wsi_mil model in lock-step (benchmarks only).

The paper's protocol is one bag per optimiser step, which on a CPU is dominated by per-step overhead.
The benchmarks repeat each experiment many times (folds x runs, repetitions), so they train all
replicas of one configuration at once: the replicas' parameters are stacked and the *library's own*
model (``wsi_mil.mil.create_model``) runs once per lock-step with the replicas as its padded batch of
bags. Only its linear layers are swapped (``_ReplicaLinear``: one ``baddbmm``, replica r's rows times
replica r's weights); every other operation of the library's models already treats each bag of a batch
on its own. The loss is the library's ``mil_loss`` with ``reduction="none"`` (one term per replica),
summed so each replica receives exactly its own gradient. The update is Adam's, per replica:
torch's fused Adam kernel runs on each active replica's rows of the stacked parameters and moments, with
that replica's own step count. A replica can sit out a lock-step (in the cross-validation benchmark,
the steps whose bag is in its held-out fold): its loss is masked, and its parameters, moments and step
count are not touched. So every replica follows exactly the arithmetic of training it alone with
``torch.optim.Adam`` on its own bags, which a test checks.

What makes a lock-step cheap on a CPU (measured with ``torch.profiler`` on MUSK1/MUSK2/Elephant, 50
replicas, one core):

* dropout masks come from numpy's random bytes, one bit per unit for p = 0.5 (``_MaskDropout``), not
  torch's ``bernoulli_``, which was a quarter of a MUSK2 lock-step, and hold the ``1 / (1 - p)`` scale,
  so dropout is one multiplication forward and one backward;
* ``forward(replicas=...)`` leaves the sitting-out replicas out of a big bag's step (their parameters
  are copied for it, which only pays on big bags: 3-5% of a MUSK2 cell);
* the model runs on the replicas as a batch, not under ``torch.func.vmap`` (9-12% of a small-bag
  lock-step, about 2% of a MUSK2 one), and the replicas' parameters are swapped into the engine's
  meta-device model directly, without ``functional_call``'s generic bookkeeping (about 3% more);
* stacked linear weights are stored as ``[R, in, out]``, the layout ``baddbmm`` takes and its weight
  gradients come out in, and gradients are taken with ``torch.autograd.grad``: no per-step layout copy
  (a third of a small-bag lock-step when the layout differed);
* Adam runs on the active replicas' rows only: no save and restore of sitting-out replicas (13% of a
  small-bag lock-step when done with torch indexing), no optimizer bookkeeping in Python (its argument
  lists are kept for each set of active replicas);
* ``keep_freed_memory()``, which the benchmarks' workers call, stops glibc from unmapping and
  page-faulting the per-step buffers again every step (about 15% of a small-bag lock-step);
* ``forward_ragged`` runs a per-instance backbone (MNIST-bags' LeNet) replica by replica on the real
  instances only, so no time goes to padding and channels-last kernels can be used, and the MIL head of
  all replicas at once on the padded embeddings.

``tests/test_paper_benchmarks.py`` checks that lock-step training (padded, ragged, and with replicas
left out of a step) equals training each replica on its own with ``torch.optim.Adam``, that a
sitting-out replica is left untouched, and that the dropout keeps each unit with probability 1 - p,
with its own mask per replica and step.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from wsi_mil.mil import MILOutput


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the system.

    A lock-step allocates and frees the same tens of megabytes (stacked activations and gradients) every
    step. By default glibc serves blocks that big with ``mmap`` and unmaps them when freed, so every step
    page-faults them in afresh: about 900 faults per Elephant lock-step, 15% of its time. This sets
    ``M_MMAP_MAX`` to 0 (every block from the heap) and ``M_TRIM_THRESHOLD`` to its maximum (the heap is
    never shrunk). It changes no numbers, only where memory comes from; the process keeps its peak heap
    until it exits. Returns False, and changes nothing, where the C library has no ``mallopt`` (not glibc).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


class _MaskDropout(nn.Module):
    """``nn.Dropout(p)`` that multiplies by a mask the engine passes in as ``multiplier``.

    The engine draws the masks with numpy (``dropout_multipliers``): torch's CPU ``bernoulli_`` costs
    about 9 ns per element, which was a quarter of a MUSK2 lock-step. The mask already holds
    ``1 / (1 - p)`` on kept units and 0 on dropped ones, so the forward pass is one multiplication and
    so is its backward (a 0/1 mask times a scale was four passes over the activations).
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        # float32 multipliers the engine sets: [R, rows * width] for x [R, rows, width] (all replicas at
        # once), or [rows * width] for one replica's x (under vmap)
        self.multiplier: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        m = self.multiplier
        if m is None:
            raise RuntimeError("the lock-step engine passes the dropout masks in training mode")
        per_row = x.numel() // m.shape[0] if m.dim() == 2 else x.numel()  # a wider mask: its first units
        return x * m[..., :per_row].reshape(x.shape)


def dropout_multipliers(rng: np.random.Generator, p: float, count: int) -> Tensor:
    """``count`` independent dropout multipliers: ``1 / (1 - p)`` with probability ``1 - p``, else 0.

    A unit is kept iff its random byte (numpy PCG64) is ``>= 256 p``: exactly a Bernoulli(1 - p) draw
    when ``256 p`` is an integer, which ``_swap_dropout`` requires. For p = 0.5 a unit takes one random
    bit instead of a byte (kept iff the bit is 1): the random draws were most of a big bag's mask time.
    The scale is the float32 ``1 / (1 - p)`` that ``nn.Dropout`` multiplies by.
    """
    threshold = round(256 * p)
    if threshold != 256 * p or not 0 < threshold < 256:
        raise ValueError(f"dropout rate {p} is not a multiple of 1/256 in (0, 1)")
    scale = np.float32(1.0 / (1.0 - p))
    if threshold == 128:
        keep = np.unpackbits(np.frombuffer(rng.bytes((count + 7) // 8), dtype=np.uint8), count=count)
    else:
        keep = np.frombuffer(rng.bytes(count), dtype=np.uint8) >= threshold
    return torch.from_numpy(np.multiply(keep, scale, dtype=np.float32))


def _swap_dropout(model: nn.Module) -> list[tuple[str, float, int | None]]:
    """Replace every ``nn.Dropout`` whose rate is a multiple of 1/256 by ``_MaskDropout``.

    Returns ``(name, rate, width)`` for each: ``width`` is the output size of the last ``nn.Linear``
    before it (the units per instance it drops), or None where there is none.
    """
    swapped = []
    width: int | None = None
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            width = module.out_features
        if type(module) is nn.Dropout and module.p > 0 and float(256 * module.p).is_integer():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, _MaskDropout(float(module.p)))
            swapped.append((name, float(module.p), width))
    return swapped


class _ReplicaLinear(nn.Module):
    """``nn.Linear`` in the engine's meta-device model, for one replica or all of them at once.

    With one replica's weight ``[out, in]`` (per-replica calls: a ragged backbone, ``vmap``) it is
    ``F.linear``. With the stacked weights in the engine's stored layout ``[R, in, out]`` and biases
    ``[R, out]`` it maps ``x [R, ..., in]`` with one ``baddbmm``: replica r's rows times its own weight.
    So the library model's ``forward`` on a padded batch ``[R, n, d]`` runs every replica at once, with
    the replicas as the batch: its other operations (attention, pooling, the loss) already treat each
    batch row on its own.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.weight, self.bias
        if weight.dim() == 2:
            return nn.functional.linear(x, weight, bias)
        rows = x.reshape(x.shape[0], -1, x.shape[-1])
        y = torch.bmm(rows, weight) if bias is None else torch.baddbmm(bias.unsqueeze(1), rows, weight)
        return y.view(*x.shape[:-1], y.shape[-1])


def _swap_linear(model: nn.Module) -> None:
    """Replace every ``nn.Linear`` of ``model`` by a ``_ReplicaLinear`` sharing its parameters."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, _ReplicaLinear(module))


class LockstepReplicas:
    """R replicas of ``models[0]``'s architecture (each with its own initial weights) trained together.

    Args:
        models: R modules of identical structure whose ``forward(x, mask)`` returns a ``MILOutput``.
        lr, weight_decay, betas, eps: Adam settings (``torch.optim.Adam`` semantics, L2 decay), applied
            with torch's fused Adam kernel (``torch._fused_adam_``, what ``torch.optim.Adam(fused=True)``
            calls), one pass over each active replica's rows.
        autocast_bf16: run ``forward`` under CPU bf16 autocast. Not used by the paper benchmarks: on
            these small models the casts cost about what bf16 saves (1.2x on MUSK2 only, slower on small
            bags); ``torch.set_float32_matmul_precision("medium")`` gets the bf16 matmuls without them.
        dropout_seed: seed of the numpy generator that draws the dropout masks (see ``_MaskDropout``).
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        lr: float,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        autocast_bf16: bool = False,
        dropout_seed: int = 0,
    ) -> None:
        self.n_replicas = len(models)
        self.base = copy.deepcopy(models[0]).to("meta")
        swapped = _swap_dropout(self.base)
        self.dropout_names = [name for name, _, _ in swapped]
        # widest layer: bounds the units per instance of a dropout whose width is not known
        max_width = max(
            (max(m.in_features, m.out_features) for m in self.base.modules() if isinstance(m, nn.Linear)),
            default=1,
        )
        self.dropout_shapes = [(p, width or max_width) for _, p, width in swapped]  # rate, units per row
        _swap_linear(self.base)
        self.dropout_rng = np.random.default_rng(dropout_seed)
        self.autocast_bf16 = autocast_bf16
        params, buffers = stack_module_state(list(models))
        if buffers:
            raise ValueError("lock-step training supports models without buffers only")
        self.names = list(params)
        # Stacked linear weights [R, out, in] are stored as contiguous [R, in, out]: _ReplicaLinear's
        # baddbmm takes them so and its weight gradients come out in that layout, so they reach Adam
        # contiguous (otherwise each is copied every step, a third of a small-bag lock-step). Per-replica
        # calls get them transposed back (_model_params).
        self.transposed = [params[k].dim() == 3 and k.endswith("weight") for k in self.names]
        self.params = [
            (params[k].transpose(1, 2) if t else params[k]).detach().contiguous().requires_grad_(True)
            for k, t in zip(self.names, self.transposed, strict=True)
        ]
        self.adam = {
            "lr": float(lr),
            "beta1": float(betas[0]),
            "beta2": float(betas[1]),
            "weight_decay": float(weight_decay),
            "eps": float(eps),
            "amsgrad": False,
            "maximize": False,
        }
        self.exp_avg = [torch.zeros_like(p, requires_grad=False) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p, requires_grad=False) for p in self.params]
        self.steps = torch.zeros(self.n_replicas)  # Adam's step count of each replica (float, as torch keeps it)
        # per-replica views of every parameter and moment (made once; Adam updates them in place)
        self._rows = [
            (p.detach().unbind(0), m.unbind(0), v.unbind(0))
            for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq, strict=True)
        ]
        self._step_rows = self.steps.unbind(0)
        # Adam's argument lists for each set of active replicas met so far (a cross-validation has a few)
        self._adam_rows: dict[tuple[int, ...], tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]] = {}
        # after forward(replicas=...): (those replicas, their parameter copies) for the next step
        self._subset: tuple[list[int], list[Tensor]] | None = None
        # where each parameter and dropout mask lives in self.base, for _call's swap
        self._slots = [self._slot(name) for name in self.names]
        self._mask_modules = [self.base.get_submodule(name) for name in self.dropout_names]
        # parameters that forward cannot run for all replicas at once (not a linear layer's)
        self._not_linear = [n for n, (module, _, _) in zip(self.names, self._slots, strict=True)
                            if not isinstance(module, _ReplicaLinear)]  # fmt: skip
        self._base_mode: bool | None = None  # train/eval mode forward last set on every module of self.base
        self.lock_steps = 0

    def _slot(self, name: str) -> tuple[nn.Module, str, Tensor]:
        owner, _, attr = name.rpartition(".")
        module = self.base.get_submodule(owner) if owner else self.base
        return module, attr, module._parameters[attr]  # type: ignore[return-value]

    @contextlib.contextmanager
    def _swapped(self, slots: Sequence[tuple[nn.Module, str, Tensor]], tensors: Sequence[Tensor]) -> Any:
        """``functional_call``'s parameter swap, done directly on the engine's own meta-device copy of the
        model (its generic bookkeeping was about 3% of a small-bag lock-step); the meta parameters are put
        back after, so no reference to a step's tensors is kept."""
        for (module, attr, _), tensor in zip(slots, tensors, strict=True):
            module._parameters[attr] = tensor  # type: ignore[assignment]
        try:
            yield
        finally:
            for module, attr, original in slots:
                module._parameters[attr] = original  # type: ignore[assignment]

    def _call(
        self,
        slots: Sequence[tuple[nn.Module, str, Tensor]],
        params: Sequence[Tensor],
        mask_modules: Sequence[nn.Module],
        masks: Sequence[Tensor],
        module: nn.Module,
        *args: Any,
    ) -> MILOutput:
        """``module(*args)`` with these (stacked) parameters in these slots and these dropout masks."""
        for mask_module, m in zip(mask_modules, masks, strict=True):
            mask_module.multiplier = m
        try:
            with self._swapped(slots, params):
                out: MILOutput = module(*args)
        finally:
            for mask_module in mask_modules:
                mask_module.multiplier = None
        return out

    def _model_params(self) -> tuple[Tensor, ...]:
        """The stacked parameters in the model's layout (views of the stored ones)."""
        return tuple(p.transpose(1, 2) if t else p for p, t in zip(self.params, self.transposed, strict=True))

    def _dropout_masks(self, rows: int, train: bool, replicas: int | None = None) -> tuple[Tensor, ...]:
        """Fresh masks for every replaced dropout, ``[replicas, rows * width]`` float32 each (see
        ``dropout_multipliers``; all R replicas by default); in eval mode dropout is the identity and they
        are empty (vmap, in per-replica calls, needs a batched argument)."""
        count = self.n_replicas if replicas is None else replicas
        if not train:
            return tuple(torch.zeros(count, 0) for _ in self.dropout_names)
        return tuple(
            dropout_multipliers(self.dropout_rng, p, count * rows * width).view(count, -1)
            for p, width in self.dropout_shapes
        )

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        *,
        shared_input: bool,
        train: bool,
        replicas: Sequence[int] | None = None,
    ) -> MILOutput:
        """Outputs stacked over replicas: ``bag_logits [R, K]``, ``instance_logits [R, n, K]``, ``attention [R, n]``.

        ``x`` is one bag for every replica (``shared_input``) or ``[R, ...]`` one bag per replica, with
        ``mask [R, n]`` when those bags are padded to a common length. The library model's ``forward``
        runs once, on the replicas as a padded batch (``_ReplicaLinear``), so the model's parameters
        must all belong to linear layers (``forward_ragged`` runs other backbones).

        ``replicas`` (ascending indices): run only these replicas; ``x`` and ``mask`` still hold all R,
        and the outputs are stacked over these only. Their parameters are copied for this lock-step, so
        the replicas left out cost nothing else: worth it when the step's work outweighs copying the
        parameters (a big bag), not otherwise. The next ``step`` must have exactly these replicas active.
        """
        if self._not_linear:
            raise NotImplementedError(
                f"forward runs models made of linear layers only, not {self._not_linear[0]}; "
                "use forward_ragged for a per-instance backbone"
            )
        if self._base_mode is not train:  # set the mode of all modules only when it changes
            self.base.train(train)
            self._base_mode = train
        self._subset = None
        params: Sequence[Tensor] = self.params  # the stored layout is _ReplicaLinear's
        count = self.n_replicas
        if replicas is not None:
            rows = [int(r) for r in replicas]
            index = torch.tensor(rows, dtype=torch.long)
            params = [p.detach().index_select(0, index).requires_grad_(True) for p in self.params]
            self._subset = (rows, params)
            count = len(rows)
            if not shared_input:
                x = x.index_select(0, index)
            if mask is not None:
                mask = mask.index_select(0, index)
        if shared_input:
            x = x.expand(count, *x.shape)
        masks = self._dropout_masks(x.shape[1], train, count)
        precision = (
            torch.autocast("cpu", dtype=torch.bfloat16) if self.autocast_bf16 else contextlib.nullcontext()
        )
        with precision:
            out = self._call(self._slots, params, self._mask_modules, masks, self.base, x, mask)
        if self.autocast_bf16:  # the library keeps attention in float32; bring the logits up too
            assert out.instance_logits is not None
            out = MILOutput(
                bag_logits=out.bag_logits.float(),
                instance_logits=out.instance_logits.float(),
                attention=out.attention.float(),
            )
        return out

    def step(self, loss_per_replica: Tensor, active: Tensor) -> None:
        """One Adam step for every active replica on its own loss; inactive replicas are not touched
        (parameters, moments and step count). After ``forward(replicas=...)``, ``loss_per_replica`` holds
        those replicas' losses and ``active`` must mark exactly them."""
        active = active.to(torch.bool)
        rows = np.flatnonzero(active.numpy()).tolist()
        subset, self._subset = self._subset, None
        if subset is not None:
            if subset[0] != rows:
                raise ValueError("the active replicas differ from the ones the last forward ran")
            grads = torch.autograd.grad(loss_per_replica.sum(), subset[1])
            grad_rows = [  # row j of each is replica rows[j]; same memory order as the parameter (below)
                (g if g.stride() == q.stride() else g.contiguous()).unbind(0)
                for q, g in zip(subset[1], grads, strict=True)
            ]
        else:
            grads = torch.autograd.grad((loss_per_replica * active.to(loss_per_replica)).sum(), self.params)
            grad_rows = []
            for p, g in zip(self.params, grads, strict=True):
                # torch's fused CPU Adam pairs elements by memory order: a gradient in another layout (a conv
                # weight's after channels-last activations) must be made contiguous like its parameter
                g_all = (g if g.stride() == p.stride() else g.contiguous()).unbind(0)
                grad_rows.append([g_all[r] for r in rows])
        self.steps += active.to(self.steps.dtype)  # torch's Adam counts the step before the update
        state = self._adam_rows.get(tuple(rows))
        if state is None:  # the active replicas' rows of every parameter, moment and step count
            state = (
                [p_rows[r] for p_rows, _, _ in self._rows for r in rows],
                [m_rows[r] for _, m_rows, _ in self._rows for r in rows],
                [v_rows[r] for _, _, v_rows in self._rows for r in rows],
                [self._step_rows[r] for r in rows] * len(self.params),
            )
            self._adam_rows[tuple(rows)] = state
        params, moments, squares, steps = state
        gradients = [g for g_rows in grad_rows for g in g_rows]
        with torch.no_grad():
            torch._fused_adam_(params, gradients, moments, squares, [], steps, **self.adam)  # type: ignore[attr-defined]
        self.lock_steps += 1

    def replica_state(self, index: int) -> dict[str, Tensor]:
        """The parameters of one replica, as a state dict for the library model."""
        return {
            k: p[index].detach().clone() for k, p in zip(self.names, self._model_params(), strict=True)
        }

    def forward_ragged(
        self, bags: Sequence[Tensor], *, backbone: str, head: str, train: bool
    ) -> tuple[MILOutput, Tensor]:
        """One bag per replica, ``bags[r]: [n_r, ...]``, through ``model.<head>(model.<backbone>(bag))``.

        The per-instance backbone runs replica by replica on the real instances only (no padding, plain
        tensors, so channels-last kernels work); the MIL head then runs on the zero-padded embeddings of
        all replicas at once (a padded batch, as in ``forward``). Returns the outputs stacked over replicas
        and the mask ``[R, n_max]``.
        """
        if any(name.startswith(f"{backbone}.") for name in self.dropout_names):
            raise NotImplementedError("dropout in a ragged backbone")
        if any(name.startswith(f"{head}.") for name in self._not_linear):
            raise NotImplementedError(f"the head {head!r} has parameters outside linear layers")
        self._subset = None
        model_params = self._model_params()
        back_prefix, head_prefix = f"{backbone}.", f"{head}."
        back = [
            (slot, p.unbind(0))  # one UnbindBackward, not R zero-filled selects
            for slot, name, p in zip(self._slots, self.names, model_params, strict=True)
            if name.startswith(back_prefix)
        ]
        back_slots = [slot for slot, _ in back]
        module = self.base.get_submodule(backbone)
        self._base_mode = None  # submodules' modes set separately
        module.train(train)
        embeddings = []
        for r, bag in enumerate(bags):
            with self._swapped(back_slots, [rows[r] for _, rows in back]):
                embeddings.append(module(bag))
        lengths = torch.tensor([e.shape[0] for e in embeddings])
        padded = torch.nn.utils.rnn.pad_sequence(embeddings, batch_first=True)  # [R, n_max, d]
        mask = torch.arange(padded.shape[1]) < lengths[:, None]
        head_module = self.base.get_submodule(head)
        head_module.train(train)
        head_state = [  # the head's parameters in the stored layout: all replicas at once (_ReplicaLinear)
            (slot, p) for slot, name, p in zip(self._slots, self.names, self.params, strict=True)
            if name.startswith(head_prefix)
        ]  # fmt: skip
        masks = self._dropout_masks(padded.shape[1], train)
        out = self._call(
            [slot for slot, _ in head_state],
            [p for _, p in head_state],
            self._mask_modules,
            masks,
            head_module,
            padded,
            mask,
        )
        return out, mask

    @torch.no_grad()
    def evaluate_submodule(self, prefix: str, replica: int, *args: Any) -> Any:
        """Eval-mode ``model.<prefix>(*args)`` with one replica's weights (no vmap, no padding): lets a
        benchmark run a per-instance backbone on each replica's own, ragged inputs."""
        module = self.base.get_submodule(prefix)
        self._base_mode = None  # submodules' modes set separately
        module.eval()
        start = f"{prefix}."
        state = {
            name.removeprefix(start): p[replica]
            for name, p in zip(self.names, self._model_params(), strict=True)
            if name.startswith(start)
        }
        return functional_call(module, state, args)

    @torch.no_grad()
    def evaluate_head(self, prefix: str, features: Tensor, mask: Tensor) -> MILOutput:
        """Eval-mode ``model.<prefix>(features[r], mask[r])`` for every replica r at once (vmap):
        ``features [R, B, n, d]``, ``mask [R, B, n]``; outputs stacked over replicas."""
        module = self.base.get_submodule(prefix)
        self._base_mode = None  # submodules' modes set separately
        module.eval()
        start = f"{prefix}."
        names = [n for n in self.names if n.startswith(start)]
        params = tuple(
            p for n, p in zip(self.names, self._model_params(), strict=True) if n.startswith(start)
        )

        def call(ps: tuple[Tensor, ...], x: Tensor, m: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            state = {n.removeprefix(start): p for n, p in zip(names, ps, strict=True)}
            out = functional_call(module, state, (x, m))
            assert out.instance_logits is not None
            return out.bag_logits, out.instance_logits, out.attention

        bag, inst, att = vmap(call, in_dims=(0, 0, 0))(params, features, mask)
        return MILOutput(bag_logits=bag, instance_logits=inst, attention=att)
