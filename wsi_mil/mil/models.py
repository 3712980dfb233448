"""MIL models behind one interface and a registry (``create_model`` / ``list_models``).

Every model maps a bag of instance features to a :class:`MILOutput`:

* one bag ``x: [n, d]`` (optionally ``mask: [n]``) gives ``bag_logits [K]``, ``instance_logits [n, K]``
  and ``attention [n]``;
* a padded batch ``x: [B, n, d]`` with ``mask: [B, n]`` (``True`` = real instance) gives
  ``bag_logits [B, K]``, ``instance_logits [B, n, K]`` and ``attention [B, n]``.

``attention`` always sums to 1 over the real instances of a bag and is exactly 0 on padding, so the
trainer, the temporal ensemble and the heatmaps can treat every model alike.

Precision under bf16/fp16 autocast (``amp_bf16``): only the instance MLP (and abmil's attention MLP)
runs in half precision. The classifier (for ``loss_attention`` the one shared by tiles and bag), the
attention scores' last layer, the attention softmax and logsumexp and every reduction over instances
run in float32 with autocast switched off, on the MLP's output cast to float32. A bf16 logit near 80
is only known to +-0.25 (8 significant bits), which moved the attention of the test bag in
``tests/test_mil_models.py`` by 0.019; in float32 the attention equals a float32 forward on the same
embeddings to 1e-6, and bags of 100,000 tiles with large logits stay finite. The MLP's own bf16 rounding
of the embeddings remains (0.004 to 0.015 of attention on that bag with a 64 or 512 wide MLP), so make
heatmaps that must match a float32 run without ``amp_bf16``.

Models (see ``list_models()``):

``loss_attention``
    Shi et al., AAAI 2020 (``shared/method.md``): instance MLP, then **one** linear ``classifier``
    shared by instances and bag; ``alpha = softmax_t(logsumexp_c z_tc)``; bag logits ``sum_t alpha_t z_t``.
``abmil``
    Attention pooling of Ilse et al. 2018, plain (``tanh``) or gated (``gated=True``).
``mean`` / ``max``
    Embedding-level mean or max pooling (Ilse et al.'s "embedding + mean/max" baselines).

For the baselines the bag classifier is also applied to each instance embedding, so every model has
per-instance logits (``softmax(instance_logits)`` is the tile's own class probability on heatmaps).

Feature standardisation (``create_model(..., standardize_features=True)``, any model) z-scores each input
feature first, ``(h - mean) / sd``. Both are buffers: they travel in the checkpoint, so predict and heatmap
apply them. The trainer fits them on the tiles of its training bags only (``fit_feature_standardization``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from wsi_mil.errors import ConfigError, InputError

logger = logging.getLogger(__name__)

__all__ = [
    "ABMIL",
    "LossAttentionMIL",
    "MaxPoolMIL",
    "MeanPoolMIL",
    "MILModel",
    "MILOutput",
    "create_model",
    "list_models",
    "register_model",
]


@dataclass(frozen=True)
class MILOutput:
    """What every MIL model returns.

    Attributes:
        bag_logits: ``[K]`` for one bag, ``[B, K]`` for a batch (float32).
        instance_logits: ``[n, K]`` / ``[B, n, K]``: the bag classifier applied to each instance
            (``None`` only for a model that cannot give them; every built-in model does).
        attention: ``[n]`` / ``[B, n]`` float32 weights, sum 1 over the real instances of each bag,
            0 on padding.
    """

    bag_logits: Tensor
    instance_logits: Tensor | None
    attention: Tensor

    def bag_probabilities(self) -> Tensor:
        """Softmax over classes of the bag logits."""
        return torch.softmax(_upcast(self.bag_logits), dim=-1)

    def instance_probabilities(self) -> Tensor | None:
        """Softmax over classes of each instance's logits (``None`` if the model has none)."""
        if self.instance_logits is None:
            return None
        return torch.softmax(_upcast(self.instance_logits), dim=-1)


def _instance_mlp(in_dim: int, hidden_dims: Sequence[int], dropout: float) -> tuple[nn.Module, int]:
    """``[Linear, ReLU, Dropout] * len(hidden_dims)``; the identity when ``hidden_dims`` is empty."""
    layers: list[nn.Module] = []
    width = in_dim
    for hidden in hidden_dims:
        layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
        width = hidden
    return (nn.Sequential(*layers) if layers else nn.Identity()), width


def _upcast(t: Tensor) -> Tensor:
    """Half precision (autocast outputs) to float32; float32/float64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _linear_float32(layer: nn.Module, x: Tensor) -> Tensor:
    """``layer(x)`` with autocast off and ``x`` cast up to float32: float32 for the (float32) parameters.
    Called as a module (not ``F.linear``), so a swapped-in layer (the benchmarks' replicas) keeps working."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _upcast(layer(_upcast(x)))


def _masked_softmax(scores: Tensor, mask: Tensor | None) -> Tensor:
    """Softmax over the instance axis (last), at least float32; padded positions get exactly 0."""
    scores = _upcast(scores)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1)


def _weighted_sum(weights: Tensor, values: Tensor) -> Tensor:
    """``sum_t weights[b, t] * values[b, t, :]`` in at least float32, outside autocast."""
    with torch.autocast(device_type=values.device.type, enabled=False):
        return torch.einsum("bn,bnk->bk", _upcast(weights), _upcast(values))


class MILModel(nn.Module):
    """Base class: handles the single-bag / padded-batch shapes and records ``hparams``.

    Subclasses implement :meth:`_forward_batch` on ``x [B, n, d]`` with ``mask [B, n]`` or ``None``
    (``None`` = no padding, which lets the model skip every masking operation on huge bags).
    """

    name: ClassVar[str] = ""

    def __init__(self, in_dim: int, n_classes: int, **hparams: Any) -> None:
        super().__init__()
        if int(in_dim) < 1:
            raise ConfigError(f"in_dim must be >= 1, got {in_dim}; pass the feature dimension of the bags.")
        if int(n_classes) < 2:
            raise ConfigError(
                f"n_classes must be >= 2, got {n_classes}: binary tasks use 2 classes with a softmax."
            )
        self.in_dim = int(in_dim)
        self.n_classes = int(n_classes)
        # JSON/YAML friendly: tuples become lists, so create_model(**model.hparams) rebuilds the model.
        self.hparams: dict[str, Any] = {
            "name": self.name,
            "in_dim": self.in_dim,
            "n_classes": self.n_classes,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in hparams.items()},
        }

    def forward(self, x: Tensor, mask: Tensor | None = None) -> MILOutput:
        """Run one bag ``[n, d]`` or a padded batch ``[B, n, d]`` (``mask [B, n]``, True = real)."""
        if x.dim() not in (2, 3):
            raise InputError(
                f"expected one bag [n, {self.in_dim}] or a padded batch [B, n, {self.in_dim}], "
                f"got shape {tuple(x.shape)}"
            )
        if x.shape[-1] != self.in_dim:
            raise InputError(
                f"features have dimension {x.shape[-1]} but the model was built for {self.in_dim}; "
                "use the encoder the model was trained with."
            )
        if x.shape[-2] == 0:
            raise InputError("a bag has no instances; drop empty bags before training or inference.")
        if self.standardizes_features:
            mean, sd = self.get_buffer("feature_mean"), self.get_buffer("feature_std")
            x = ((x.float() - mean) / sd).to(x.dtype)
        single = x.dim() == 2
        if mask is not None:
            if mask.shape != x.shape[:-1]:
                raise InputError(f"mask shape {tuple(mask.shape)} does not match features {tuple(x.shape)}")
            mask = mask.bool()
        if single:
            out = self._forward_batch(x.unsqueeze(0), None if mask is None else mask.unsqueeze(0))
            return MILOutput(
                bag_logits=out.bag_logits.squeeze(0),
                instance_logits=None if out.instance_logits is None else out.instance_logits.squeeze(0),
                attention=out.attention.squeeze(0),
            )
        return self._forward_batch(x, mask)

    def _forward_batch(self, x: Tensor, mask: Tensor | None) -> MILOutput:  # pragma: no cover
        raise NotImplementedError

    @property
    def standardizes_features(self) -> bool:  # created with standardize_features=True
        return bool(self.hparams.get("standardize_features", False))

    def add_feature_standardization(self) -> None:
        """Z-score the inputs with buffers ``feature_mean``, ``feature_std`` (0, 1 until fitted or loaded)."""
        self.register_buffer("feature_mean", torch.zeros(self.in_dim))
        self.register_buffer("feature_std", torch.ones(self.in_dim))
        self.hparams["standardize_features"] = True

    def fit_feature_standardization(self, bags: Iterable[Tensor]) -> int:
        """Set mean and s.d. to those of every tile (row) of ``bags`` (each ``[n, d]``; float64, merged bag by
        bag); a feature with s.d. under 1e-6 of its scale is only centred. Returns the number of tiles."""
        if not self.standardizes_features:
            raise ConfigError("the model does not standardise features; create it with standardize_features=True")
        count, mean = 0, torch.zeros(self.in_dim, dtype=torch.float64)
        m2 = torch.zeros_like(mean)
        for bag in bags:
            h = bag.detach().to("cpu", torch.float64)
            n, bag_mean = h.shape[0], h.mean(0)
            delta = bag_mean - mean
            m2 += ((h - bag_mean) ** 2).sum(0) + delta**2 * count * n / (count + n)
            mean += delta * n / (count + n)
            count += n
        if count == 0:
            raise InputError("no tiles to fit the feature standardisation on: the training bags are empty")
        sd = (m2 / count).sqrt()
        sd = torch.where(sd > 1e-6 * mean.abs().clamp(min=1.0), sd, torch.ones_like(sd))
        self.get_buffer("feature_mean").copy_(mean.float())
        self.get_buffer("feature_std").copy_(sd.float())
        return count


_REGISTRY: dict[str, type[MILModel]] = {}


def register_model(name: str) -> Callable[[type[MILModel]], type[MILModel]]:
    """Class decorator adding a :class:`MILModel` subclass to the registry under ``name``."""

    def decorator(cls: type[MILModel]) -> type[MILModel]:
        if name in _REGISTRY:
            raise ConfigError(f"MIL model name {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(_REGISTRY)


def create_model(name: str, in_dim: int, n_classes: int, **kwargs: Any) -> MILModel:
    """Build a registered MIL model; ``create_model(**model.hparams)`` rebuilds a model.
    ``standardize_features=True`` (any model) z-scores the inputs (see the module docstring).

    Raises:
        ConfigError: unknown name (the message lists the known ones) or invalid arguments.
    """
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown MIL model {name!r}; choose one of: {', '.join(list_models())}") from None
    standardize = kwargs.pop("standardize_features", False)
    if not isinstance(standardize, bool):
        raise ConfigError(f"standardize_features must be true or false, got {standardize!r}")
    try:
        model = cls(in_dim=in_dim, n_classes=n_classes, **kwargs)
    except TypeError as exc:  # unexpected keyword
        raise ConfigError(f"invalid arguments for MIL model {name!r}: {exc}") from exc
    if standardize:
        model.add_feature_standardization()
    return model


def _check_dropout(dropout: float) -> float:
    if not 0.0 <= float(dropout) < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
    return float(dropout)


class _EmbeddingMIL(MILModel):
    """An instance MLP ``e_t = mlp(h_t)`` and one linear ``classifier`` shared by tiles and bag."""

    def __init__(
        self, in_dim: int, n_classes: int, hidden_dims: Sequence[int] = (512,), dropout: float = 0.25
    ) -> None:
        hidden_dims = tuple(int(h) for h in hidden_dims)
        super().__init__(in_dim, n_classes, hidden_dims=hidden_dims, dropout=_check_dropout(dropout))
        self.mlp, self.embed_dim = _instance_mlp(self.in_dim, hidden_dims, float(dropout))
        self.classifier = nn.Linear(self.embed_dim, self.n_classes)


def _pooled_output(classifier: nn.Linear, bag_embedding: Tensor, embeddings: Tensor, attention: Tensor) -> MILOutput:
    """Bag logits from the pooled embedding and instance logits from each tile's, by one float32 classifier."""
    return MILOutput(
        bag_logits=_linear_float32(classifier, bag_embedding),
        instance_logits=_linear_float32(classifier, embeddings),
        attention=attention,
    )


@register_model("loss_attention")
class LossAttentionMIL(_EmbeddingMIL):
    """Loss-based attention MIL (Shi et al., AAAI 2020), term by term as in ``shared/method.md``.

    ``e_t = mlp(h_t)``; ``z_t = classifier(e_t)`` (the one shared ``nn.Linear``);
    ``alpha_t = softmax_t(logsumexp_c z_tc)`` per bag (padding masked with ``-inf``);
    bag logits ``Z = sum_t alpha_t z_t``, which equals ``classifier(sum_t alpha_t e_t)`` because the
    classifier is affine and the weights sum to 1. The attention has no parameters of its own, so every
    gradient of ``alpha`` flows into the classifier and the instance MLP.
    """

    def _forward_batch(self, x: Tensor, mask: Tensor | None) -> MILOutput:
        embeddings = self.mlp(x)  # bf16 under autocast: the MLP is where the time goes
        logits = _linear_float32(self.classifier, embeddings)  # z: [B, n, K], float32 under autocast too
        if mask is not None:
            # Padded rows may hold anything; make their logits 0 so 0 * z stays 0 in the bag sum.
            logits = logits.masked_fill(~mask.unsqueeze(-1), 0.0)
        attention = _masked_softmax(torch.logsumexp(logits, dim=-1), mask)  # [B, n]
        bag_logits = _weighted_sum(attention, logits)
        return MILOutput(bag_logits=bag_logits, instance_logits=logits, attention=attention)


@register_model("abmil")
class ABMIL(MILModel):
    """Attention-based deep MIL (Ilse et al., ICML 2018), plain or gated attention.

    ``a_t = w^T tanh(V e_t)`` (gated: ``w^T (tanh(V e_t) * sigmoid(U e_t))``), ``alpha = softmax_t(a)``,
    ``E = sum_t alpha_t e_t``, bag logits ``classifier(E)``. Instance logits are ``classifier(e_t)``.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden_dims: Sequence[int] = (512,),
        dropout: float = 0.25,
        attention_dim: int = 128,
        gated: bool = False,
    ) -> None:
        hidden_dims = tuple(int(h) for h in hidden_dims)
        if int(attention_dim) < 1:
            raise ConfigError(f"attention_dim must be >= 1, got {attention_dim}")
        super().__init__(
            in_dim,
            n_classes,
            hidden_dims=hidden_dims,
            dropout=_check_dropout(dropout),
            attention_dim=int(attention_dim),
            gated=bool(gated),
        )
        self.gated = bool(gated)
        self.mlp, self.embed_dim = _instance_mlp(self.in_dim, hidden_dims, float(dropout))
        self.attention_v = nn.Linear(self.embed_dim, int(attention_dim))
        self.attention_u = nn.Linear(self.embed_dim, int(attention_dim)) if self.gated else None
        self.attention_w = nn.Linear(int(attention_dim), 1)
        self.classifier = nn.Linear(self.embed_dim, self.n_classes)

    def _forward_batch(self, x: Tensor, mask: Tensor | None) -> MILOutput:
        embeddings = self.mlp(x)
        hidden = torch.tanh(self.attention_v(embeddings))
        if self.attention_u is not None:
            hidden = hidden * torch.sigmoid(self.attention_u(embeddings))
        attention = _masked_softmax(_linear_float32(self.attention_w, hidden).squeeze(-1), mask)
        if mask is not None:
            embeddings = embeddings.masked_fill(~mask.unsqueeze(-1), 0.0)
        return _pooled_output(self.classifier, _weighted_sum(attention, embeddings), embeddings, attention)


@register_model("mean")
class MeanPoolMIL(_EmbeddingMIL):
    """Embedding mean pooling: ``classifier(mean_t e_t)``; attention is uniform ``1 / n_real``."""

    def _forward_batch(self, x: Tensor, mask: Tensor | None) -> MILOutput:
        embeddings = _upcast(self.mlp(x))
        if mask is None:
            attention = embeddings.new_full(embeddings.shape[:2], 1.0 / embeddings.shape[1])
        else:
            weights = mask.to(embeddings.dtype)
            attention = weights / weights.sum(dim=1, keepdim=True)
            embeddings = embeddings.masked_fill(~mask.unsqueeze(-1), 0.0)
        return _pooled_output(self.classifier, _weighted_sum(attention, embeddings), embeddings, attention)


@register_model("max")
class MaxPoolMIL(_EmbeddingMIL):
    """Embedding max pooling: ``classifier(max_t e_t)`` with the max taken per embedding dimension.

    Attention (a read-out only, it does not enter the prediction): ``alpha_t`` is the share of the
    ``m`` embedding dimensions whose maximum instance ``t`` is (first index on ties), so it sums to 1
    over the real instances, is 0 on padding and on instances that win no dimension, and is one-hot
    when one instance carries every maximum.
    """

    def _forward_batch(self, x: Tensor, mask: Tensor | None) -> MILOutput:
        embeddings = _upcast(self.mlp(x))
        pooled_input = embeddings
        if mask is not None:
            pooled_input = embeddings.masked_fill(~mask.unsqueeze(-1), float("-inf"))
            embeddings = embeddings.masked_fill(~mask.unsqueeze(-1), 0.0)
        bag_embedding, winners = pooled_input.max(dim=1)  # [B, m], [B, m]
        # Count, for each instance, the embedding dimensions it wins (no [B, m, n] one-hot on big bags).
        wins = embeddings.new_zeros(embeddings.shape[:2])
        wins = wins.scatter_add(1, winners, torch.ones_like(bag_embedding))
        return _pooled_output(self.classifier, bag_embedding, embeddings, wins / winners.shape[1])
