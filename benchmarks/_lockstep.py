"""Train R independent replicas of one wsi_mil model in lock-step (benchmarks only).

The paper's protocol is one bag per optimiser step, which on a CPU is dominated by per-step overhead.
The benchmarks repeat each experiment many times (folds x runs, repetitions), so they train all
replicas of one configuration at once: the replicas' parameters are stacked and the *library's own*
model (``wsi_mil.mil.create_model``) is evaluated for every replica with ``torch.func.vmap`` over
``functional_call``; the loss is the library's ``mil_loss`` with ``reduction="none"`` (one term per
replica), summed so each replica receives exactly its own gradient. The optimiser is
``torch.optim.Adam`` (fused kernel) on the stacked tensors; Adam is elementwise, so each replica gets
exactly the update it would get alone, with one exception: the bias correction uses one step count for
all replicas (the number of lock-steps). In the cross-validation benchmark a replica sits out the steps
whose bag is in its held-out fold (its loss is masked and its parameters and moments are restored after
the update), so its own step count is about 10% lower; this changes its effective step size by at most
5% in the first epochs and by under 0.5% after 50 epochs. Without sitting-out steps (MNIST-bags) the
arithmetic is exactly Adam's.

What makes a lock-step cheap on a CPU (measured with ``torch.profiler`` on MUSK1/MUSK2/Elephant, 50
replicas, one core):

* dropout masks come from numpy's random bytes (``_BytesDropout``), not torch's ``bernoulli_``, which
  was a quarter of a MUSK2 lock-step;
* stacked linear weights are stored in the layout vmap's weight gradients come out in, and gradients
  are taken with ``torch.autograd.grad``: no per-step layout copy (a third of a small-bag lock-step);
* the rows of sitting-out replicas are saved and restored with two ``torch._foreach`` calls;
* ``forward_ragged`` runs a per-instance backbone (MNIST-bags' LeNet) replica by replica on the real
  instances only, so no time goes to padding and channels-last kernels can be used, and the MIL head of
  all replicas at once on the padded embeddings.

``tests/test_paper_benchmarks.py`` checks that lock-step training (padded and ragged) equals training
each replica on its own with ``torch.optim.Adam``, that a sitting-out replica is left untouched, and
that the dropout keeps each unit with probability 1 - p, with its own mask per replica and step.
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


class _BytesDropout(nn.Module):
    """``nn.Dropout(p)`` with its keep-mask read from random bytes the engine passes in as ``bits``.

    torch's CPU ``bernoulli_`` costs about 9 ns per element, which was a quarter of a MUSK2 lock-step;
    numpy's PCG64 gives random bytes at about 0.05 ns each. A unit is kept iff its byte is
    ``>= 256 p``, which is a Bernoulli(1 - p) draw exactly when ``256 p`` is an integer (0.5, 0.25, ...;
    other rates keep torch's dropout). Kept units are scaled by ``1 / (1 - p)``, as ``nn.Dropout`` does.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.threshold = round(256 * p)
        self.bits: Tensor | None = None  # [rows * width] uint8 for one replica, set through functional_call

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.bits is None:
            raise RuntimeError("the lock-step engine passes the dropout bytes in training mode")
        keep = self.bits[: x.numel()].view(x.shape) >= self.threshold
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))


def _swap_dropout(model: nn.Module) -> list[str]:
    """Replace every ``nn.Dropout`` whose rate is a multiple of 1/256 by ``_BytesDropout``; their names."""
    names = []
    for name, module in list(model.named_modules()):
        if type(module) is nn.Dropout and module.p > 0 and float(256 * module.p).is_integer():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, _BytesDropout(float(module.p)))
            names.append(name)
    return names


class LockstepReplicas:
    """R replicas of ``models[0]``'s architecture (each with its own initial weights) trained together.

    Args:
        models: R modules of identical structure whose ``forward(x, mask)`` returns a ``MILOutput``.
        lr, weight_decay, betas, eps: Adam settings (``torch.optim.Adam`` semantics, L2 decay).
        fused: torch's fused Adam kernel (one pass over each stacked tensor).
        autocast_bf16: run ``forward`` under CPU bf16 autocast. Not used by the paper benchmarks: on
            these small models the casts cost about what bf16 saves (1.2x on MUSK2 only, slower on small
            bags); ``torch.set_float32_matmul_precision("medium")`` gets the bf16 matmuls without them.
        dropout_seed: seed of the numpy generator that draws the dropout masks (see ``_BytesDropout``).
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        lr: float,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        fused: bool = True,
        autocast_bf16: bool = False,
        dropout_seed: int = 0,
    ) -> None:
        self.n_replicas = len(models)
        self.base = copy.deepcopy(models[0]).to("meta")
        self.dropout_names = _swap_dropout(self.base)
        # widest layer: bounds the units per instance that any dropout of the instance MLP sees
        self.max_width = max(
            (max(m.in_features, m.out_features) for m in self.base.modules() if isinstance(m, nn.Linear)),
            default=1,
        )
        self.dropout_rng = np.random.default_rng(dropout_seed)
        self.autocast_bf16 = autocast_bf16
        params, buffers = stack_module_state(list(models))
        if buffers:
            raise ValueError("lock-step training supports models without buffers only")
        self.names = list(params)
        # Stacked linear weights [R, out, in] are stored as contiguous [R, in, out] and handed to the model
        # transposed: vmap's weight gradients come out in that layout, so they reach Adam contiguous
        # (otherwise each is copied every step, a third of a small-bag lock-step).
        self.transposed = [params[k].dim() == 3 and k.endswith("weight") for k in self.names]
        self.params = [
            (params[k].transpose(1, 2) if t else params[k]).detach().contiguous().requires_grad_(True)
            for k, t in zip(self.names, self.transposed, strict=True)
        ]
        # torch's fused Adam on the stacked tensors: elementwise, so every replica gets its own update
        self.optimizer = torch.optim.Adam(
            self.params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, fused=fused
        )
        self.lock_steps = 0

    def _call(
        self, params: tuple[Tensor, ...], bits: tuple[Tensor, ...], x: Tensor, mask: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        state = dict(zip(self.names, params, strict=True))
        state.update({f"{name}.bits": b for name, b in zip(self.dropout_names, bits, strict=True)})
        out = functional_call(self.base, state, (x, mask))
        assert out.instance_logits is not None
        return out.bag_logits, out.instance_logits, out.attention

    def _model_params(self) -> tuple[Tensor, ...]:
        """The stacked parameters in the model's layout (views of the stored ones)."""
        return tuple(p.transpose(1, 2) if t else p for p, t in zip(self.params, self.transposed, strict=True))

    def _dropout_bits(self, rows: int) -> tuple[Tensor, ...]:
        """Fresh random bytes for every replaced dropout: ``[R, rows * max_width]`` uint8 each."""
        size = rows * self.max_width
        return tuple(
            torch.frombuffer(bytearray(self.dropout_rng.bytes(self.n_replicas * size)), dtype=torch.uint8).view(
                self.n_replicas, size
            )
            for _ in self.dropout_names
        )

    def forward(self, x: Tensor, mask: Tensor | None = None, *, shared_input: bool, train: bool) -> MILOutput:
        """Outputs stacked over replicas: ``bag_logits [R, K]``, ``instance_logits [R, n, K]``, ``attention [R, n]``.

        ``x`` is one bag for every replica (``shared_input``) or ``[R, ...]`` one bag per replica, with
        ``mask [R, n]`` when those bags are padded to a common length.
        """
        self.base.train(train)
        in_x = None if shared_input else 0
        params = self._model_params()
        rows = x.shape[0] if shared_input else x.shape[1]  # instances per replica (per bag when padded)
        if train:
            bits = self._dropout_bits(rows)
        else:  # dropout is the identity in eval mode; vmap still needs a batched argument
            bits = tuple(torch.zeros(self.n_replicas, 0, dtype=torch.uint8) for _ in self.dropout_names)
        precision = (
            torch.autocast("cpu", dtype=torch.bfloat16) if self.autocast_bf16 else contextlib.nullcontext()
        )
        with precision:
            if mask is None:

                def call(p: tuple[Tensor, ...], b: tuple[Tensor, ...], xx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
                    return self._call(p, b, xx, None)

                fn: Any = vmap(call, in_dims=(0, 0, in_x), randomness="different" if train else "error")
                bag, inst, att = fn(params, bits, x)
            else:
                fn = vmap(self._call, in_dims=(0, 0, in_x, 0), randomness="different" if train else "error")
                bag, inst, att = fn(params, bits, x, mask)
        if self.autocast_bf16:  # the library keeps attention in float32; bring the logits up too
            bag, inst, att = bag.float(), inst.float(), att.float()
        return MILOutput(bag_logits=bag, instance_logits=inst, attention=att)

    def step(self, loss_per_replica: Tensor, active: Tensor) -> None:
        """One Adam step for every active replica on its own loss; inactive replicas are left untouched
        (parameters and moments restored after the fused update)."""
        active = active.to(torch.bool)
        grads = torch.autograd.grad((loss_per_replica * active.to(loss_per_replica)).sum(), self.params)
        for p, g in zip(self.params, grads, strict=True):
            # torch's fused CPU Adam pairs elements by memory order: a gradient in another layout (a conv
            # weight's after channels-last activations) must be made contiguous like its parameter
            p.grad = g if g.stride() == p.stride() else g.contiguous()
        inactive = torch.nonzero(~active).flatten().tolist()
        views: list[Tensor] = []
        saved: list[Tensor] = []
        if inactive and self.optimizer.state:
            # the rows of the sitting-out replicas (parameters and both moments), saved and restored with
            # two foreach calls: per-tensor indexing was 13% of a small-bag lock-step
            for p in self.params:
                state = self.optimizer.state[p]
                for tensor in (p.detach(), state["exp_avg"], state["exp_avg_sq"]):
                    views += [tensor[r] for r in inactive]
            saved = torch._foreach_mul(views, 1.0)
        elif inactive:  # first step: Adam creates the moments (zeros) in step(); restore them to zero
            views = [p.detach()[r] for p in self.params for r in inactive]
            saved = torch._foreach_mul(views, 1.0)
        first_step = not self.optimizer.state
        self.optimizer.step()
        self.lock_steps += 1
        if saved:
            with torch.no_grad():
                torch._foreach_copy_(views, saved)
                if first_step:
                    for p in self.params:
                        state = self.optimizer.state[p]
                        for r in inactive:
                            state["exp_avg"][r].zero_()
                            state["exp_avg_sq"][r].zero_()

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
        all replicas at once (vmap). Returns the outputs stacked over replicas and the mask ``[R, n_max]``.
        """
        if any(name.startswith(f"{backbone}.") for name in self.dropout_names):
            raise NotImplementedError("dropout in a ragged backbone")
        model_params = self._model_params()
        back_prefix, head_prefix = f"{backbone}.", f"{head}."
        per_replica = [
            (name.removeprefix(back_prefix), p.unbind(0))  # one UnbindBackward, not R zero-filled selects
            for name, p in zip(self.names, model_params, strict=True)
            if name.startswith(back_prefix)
        ]
        module = self.base.get_submodule(backbone)
        module.train(train)
        embeddings = [
            functional_call(module, {name: ps[r] for name, ps in per_replica}, (bag,))
            for r, bag in enumerate(bags)
        ]
        lengths = torch.tensor([e.shape[0] for e in embeddings])
        padded = torch.nn.utils.rnn.pad_sequence(embeddings, batch_first=True)  # [R, n_max, d]
        mask = torch.arange(padded.shape[1]) < lengths[:, None]
        head_module = self.base.get_submodule(head)
        head_module.train(train)
        head_names = [n for n in self.names if n.startswith(head_prefix)]
        head_params = tuple(
            p for n, p in zip(self.names, model_params, strict=True) if n.startswith(head_prefix)
        )
        dropout_names = [n.removeprefix(head_prefix) for n in self.dropout_names]
        if train:
            bits = self._dropout_bits(padded.shape[1])
        else:
            bits = tuple(torch.zeros(self.n_replicas, 0, dtype=torch.uint8) for _ in self.dropout_names)

        def call(
            ps: tuple[Tensor, ...], bs: tuple[Tensor, ...], x: Tensor, m: Tensor
        ) -> tuple[Tensor, Tensor, Tensor]:
            state = {n.removeprefix(head_prefix): p for n, p in zip(head_names, ps, strict=True)}
            state.update({f"{n}.bits": b for n, b in zip(dropout_names, bs, strict=True)})
            out = functional_call(head_module, state, (x, m))
            assert out.instance_logits is not None
            return out.bag_logits, out.instance_logits, out.attention

        fn = vmap(call, in_dims=(0, 0, 0, 0), randomness="different" if train else "error")
        bag, inst, att = fn(head_params, bits, padded, mask)
        return MILOutput(bag_logits=bag, instance_logits=inst, attention=att), mask

    @torch.no_grad()
    def evaluate_submodule(self, prefix: str, replica: int, *args: Any) -> Any:
        """Eval-mode ``model.<prefix>(*args)`` with one replica's weights (no vmap, no padding): lets a
        benchmark run a per-instance backbone on each replica's own, ragged inputs."""
        module = self.base.get_submodule(prefix)
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
