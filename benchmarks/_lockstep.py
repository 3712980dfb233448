"""Train R independent replicas of one wsi_mil model in lock-step (benchmarks only).

The paper's protocol is one bag per optimiser step, which on a CPU is dominated by per-step overhead.
The benchmarks repeat each experiment many times (folds x runs, repetitions), so they train all
replicas of one configuration at once: the replicas' parameters are stacked and the *library's own*
model (``wsi_mil.mil.create_model``) is evaluated for every replica with ``torch.func.vmap`` over
``functional_call``; the loss is the library's ``mil_loss`` with ``reduction="none"`` (one term per
replica), summed so each replica receives exactly its own gradient. The optimiser is
``torch.optim.Adam`` (fused kernel) on the stacked tensors; Adam is elementwise, so each replica gets exactly the update it would get alone, with one
exception: the bias correction uses one step count for all replicas (the number of lock-steps). In the
cross-validation benchmark a replica sits out the steps whose bag is in its held-out fold (its loss is
masked and its parameters and moments are restored after the update), so its own step count is about
10% lower; this changes its effective step size by at most 5% in the first epochs and by under 0.5%
after 50 epochs. Without sitting-out steps (MNIST-bags) the arithmetic is exactly Adam's.
``tests/test_paper_benchmarks.py`` checks that lock-step training equals training each replica on its
own with ``torch.optim.Adam``, and that a sitting-out replica is left untouched.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from wsi_mil.mil import MILOutput


class LockstepReplicas:
    """R replicas of ``models[0]``'s architecture (each with its own initial weights) trained together.

    Args:
        models: R modules of identical structure whose ``forward(x, mask)`` returns a ``MILOutput``.
        lr, weight_decay, betas, eps: Adam settings (``torch.optim.Adam`` semantics, L2 decay).
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        lr: float,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        fused: bool = True,
    ) -> None:
        self.n_replicas = len(models)
        self.base = copy.deepcopy(models[0]).to("meta")
        params, buffers = stack_module_state(list(models))
        if buffers:
            raise ValueError("lock-step training supports models without buffers only")
        self.names = list(params)
        self.params = [params[k].detach().clone().requires_grad_(True) for k in self.names]
        # torch's fused Adam on the stacked tensors: elementwise, so every replica gets its own update
        self.optimizer = torch.optim.Adam(
            self.params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, fused=fused
        )
        self.lock_steps = 0

    def _call(
        self, params: tuple[Tensor, ...], x: Tensor, mask: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        out = functional_call(self.base, dict(zip(self.names, params, strict=True)), (x, mask))
        assert out.instance_logits is not None
        return out.bag_logits, out.instance_logits, out.attention

    def forward(self, x: Tensor, mask: Tensor | None = None, *, shared_input: bool, train: bool) -> MILOutput:
        """Outputs stacked over replicas: ``bag_logits [R, K]``, ``instance_logits [R, n, K]``, ``attention [R, n]``.

        ``x`` is one bag for every replica (``shared_input``) or ``[R, ...]`` one bag per replica, with
        ``mask [R, n]`` when those bags are padded to a common length.
        """
        self.base.train(train)
        in_x = None if shared_input else 0
        params = tuple(self.params)
        if mask is None:

            def call(p: tuple[Tensor, ...], xx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
                return self._call(p, xx, None)

            fn: Any = vmap(call, in_dims=(0, in_x), randomness="different" if train else "error")
            bag, inst, att = fn(params, x)
        else:
            fn = vmap(self._call, in_dims=(0, in_x, 0), randomness="different" if train else "error")
            bag, inst, att = fn(params, x, mask)
        return MILOutput(bag_logits=bag, instance_logits=inst, attention=att)

    def step(self, loss_per_replica: Tensor, active: Tensor) -> None:
        """One Adam step for every active replica on its own loss; inactive replicas are left untouched
        (parameters and moments restored after the fused update)."""
        active = active.to(torch.bool)
        self.optimizer.zero_grad(set_to_none=True)  # backward then writes the gradients, no zero-fill and add
        (loss_per_replica * active.to(loss_per_replica)).sum().backward()
        inactive = torch.nonzero(~active).flatten()
        saved: list[tuple[Tensor, ...]] = []
        if inactive.numel():
            with torch.no_grad():
                for p in self.params:
                    state = self.optimizer.state.get(p)
                    moments = (
                        (state["exp_avg"][inactive].clone(), state["exp_avg_sq"][inactive].clone())
                        if state
                        else (torch.zeros_like(p[inactive]), torch.zeros_like(p[inactive]))
                    )
                    saved.append((p[inactive].clone(), *moments))
        self.optimizer.step()
        self.lock_steps += 1
        if saved:
            with torch.no_grad():
                for p, (old_p, old_m, old_v) in zip(self.params, saved, strict=True):
                    state = self.optimizer.state[p]
                    p[inactive] = old_p
                    state["exp_avg"][inactive] = old_m
                    state["exp_avg_sq"][inactive] = old_v

    def replica_state(self, index: int) -> dict[str, Tensor]:
        """The parameters of one replica, as a state dict for the library model."""
        return {k: p[index].detach().clone() for k, p in zip(self.names, self.params, strict=True)}
