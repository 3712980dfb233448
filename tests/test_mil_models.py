"""MIL models: the loss-attention identities, masking, shapes, numerics and the registry."""

from __future__ import annotations

import pytest
import torch

from wsi_mil.errors import ConfigError, InputError
from wsi_mil.mil import LossAttentionMIL, MILOutput, create_model, list_models

pytestmark = pytest.mark.usefixtures("one_torch_thread")


ALL_MODELS = [
    ("loss_attention", {}),
    ("abmil", {}),
    ("abmil", {"gated": True}),
    ("mean", {}),
    ("max", {}),
]


def _model(name: str = "loss_attention", in_dim: int = 12, n_classes: int = 3, **kwargs: object):
    torch.manual_seed(0)
    model = create_model(name, in_dim=in_dim, n_classes=n_classes, hidden_dims=(16, 8), dropout=0.0, **kwargs)
    return model.eval().double()


def test_loss_attention_identities_on_random_inputs() -> None:
    model = _model()
    x = torch.randn(37, 12, dtype=torch.float64)
    out = model(x)
    embeddings = model.mlp(x)
    z = model.classifier(embeddings)
    # one shared classifier: the instance logits are the classifier applied to the embeddings
    torch.testing.assert_close(out.instance_logits, z)
    # alpha = softmax over instances of logsumexp over classes
    alpha = torch.softmax(torch.logsumexp(z, dim=-1), dim=0)
    torch.testing.assert_close(out.attention.double(), alpha, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(out.attention.sum(), torch.tensor(1.0, dtype=torch.float64))
    # bag logits: sum_t alpha_t z_t == W (sum_t alpha_t e_t) + b (the classifier applied to the bag embedding)
    bag_embedding = (alpha.unsqueeze(-1) * embeddings).sum(0)
    torch.testing.assert_close(
        out.bag_logits.double(), (alpha.unsqueeze(-1) * z).sum(0), rtol=1e-6, atol=1e-6
    )
    torch.testing.assert_close(out.bag_logits.double(), model.classifier(bag_embedding), rtol=1e-6, atol=1e-6)
    # explicit form of alpha_t = sum_c exp(z_tc) / sum_s sum_c exp(z_sc)
    explicit = z.exp().sum(-1) / z.exp().sum()
    torch.testing.assert_close(out.attention.double(), explicit, rtol=1e-6, atol=1e-9)


def test_loss_attention_has_exactly_one_linear_after_the_mlp() -> None:
    model = LossAttentionMIL(in_dim=10, n_classes=2, hidden_dims=(8,))
    assert isinstance(model.classifier, torch.nn.Linear)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert names == ["mlp.0", "classifier"]  # no attention parameters of its own
    assert model.hparams == {
        "name": "loss_attention",
        "in_dim": 10,
        "n_classes": 2,
        "hidden_dims": [8],
        "dropout": 0.25,
    }


@pytest.mark.parametrize(("name", "kwargs"), ALL_MODELS)
def test_permuting_instances_permutes_attention_and_keeps_bag_output(name: str, kwargs: dict) -> None:
    model = _model(name, **kwargs)
    x = torch.randn(25, 12, dtype=torch.float64)
    perm = torch.randperm(25, generator=torch.Generator().manual_seed(1))
    a, b = model(x), model(x[perm])
    torch.testing.assert_close(b.bag_logits, a.bag_logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b.attention, a.attention[perm], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b.instance_logits, a.instance_logits[perm], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("name", "kwargs"), ALL_MODELS)
def test_padded_batch_equals_bag_by_bag(name: str, kwargs: dict) -> None:
    model = _model(name, **kwargs)
    lengths = [5, 1, 17, 9]
    bags = [torch.randn(n, 12, dtype=torch.float64) for n in lengths]
    batch = torch.full((4, 17, 12), 1e6, dtype=torch.float64)  # garbage padding must not leak
    mask = torch.zeros(4, 17, dtype=torch.bool)
    for i, bag in enumerate(bags):
        batch[i, : len(bag)] = bag
        mask[i, : len(bag)] = True
    out = model(batch, mask)
    assert out.bag_logits.shape == (4, 3) and out.attention.shape == (4, 17)
    assert out.instance_logits is not None and out.instance_logits.shape == (4, 17, 3)
    for i, bag in enumerate(bags):
        single = model(bag)
        n = len(bag)
        torch.testing.assert_close(out.bag_logits[i], single.bag_logits, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out.attention[i, :n], single.attention, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(out.instance_logits[i, :n], single.instance_logits, rtol=1e-6, atol=1e-6)
        assert torch.all(out.attention[i, n:] == 0)


@pytest.mark.parametrize(("name", "kwargs"), ALL_MODELS)
def test_one_instance_bag_and_output_contract(name: str, kwargs: dict) -> None:
    model = _model(name, **kwargs)
    x = torch.randn(1, 12, dtype=torch.float64)
    out = model(x)
    assert isinstance(out, MILOutput)
    assert out.bag_logits.shape == (3,) and out.attention.shape == (1,)
    torch.testing.assert_close(out.attention, torch.ones(1, dtype=out.attention.dtype))
    # with one instance the bag prediction is that instance's prediction, for every model
    torch.testing.assert_close(out.bag_logits.double(), out.instance_logits[0].double(), rtol=1e-6, atol=1e-6)
    probs = out.bag_probabilities()
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0, dtype=probs.dtype))


@pytest.mark.parametrize(("name", "kwargs"), ALL_MODELS)
def test_attention_sums_to_one_and_is_nonnegative(name: str, kwargs: dict) -> None:
    model = _model(name, **kwargs)
    out = model(torch.randn(3, 40, 12, dtype=torch.float64))
    assert torch.all(out.attention >= 0)
    torch.testing.assert_close(out.attention.sum(-1).double(), torch.ones(3, dtype=torch.float64))


def test_mean_attention_is_uniform_and_max_attention_counts_winning_dimensions() -> None:
    mean = _model("mean")
    out = mean(torch.randn(8, 12, dtype=torch.float64))
    torch.testing.assert_close(out.attention.double(), torch.full((8,), 1 / 8, dtype=torch.float64))

    max_model = _model("max")
    x = torch.randn(6, 12, dtype=torch.float64)
    out = max_model(x)
    winners = max_model.mlp(x).argmax(dim=0)  # per embedding dimension
    expected = torch.bincount(winners, minlength=6).double() / winners.numel()
    torch.testing.assert_close(out.attention.double(), expected)


def _huge_bag_model(seed: int = 0) -> LossAttentionMIL:
    torch.manual_seed(seed)
    model = LossAttentionMIL(in_dim=8, n_classes=2, hidden_dims=(), dropout=0.0)
    with torch.no_grad():  # logits of +-1000 for unit-scale features
        model.classifier.weight.copy_(torch.randn(2, 8) * 400.0)
        model.classifier.bias.zero_()
    return model.eval()


def test_huge_bag_with_extreme_logits_is_finite_in_float32_and_bf16_autocast() -> None:
    model = _huge_bag_model()
    x = torch.randn(50_000, 8, generator=torch.Generator().manual_seed(0))
    out32 = model(x)
    assert out32.instance_logits is not None
    assert out32.instance_logits.abs().max() > 900  # the logits really are around +-1000
    for out in (out32,):
        assert torch.isfinite(out.bag_logits).all() and torch.isfinite(out.attention).all()
        assert abs(float(out.attention.detach().sum()) - 1.0) < 1e-4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = model(x)
    assert out16.attention.dtype == torch.float32 and out16.bag_logits.dtype == torch.float32
    assert torch.isfinite(out16.bag_logits).all() and torch.isfinite(out16.attention).all()
    assert abs(float(out16.attention.detach().sum()) - 1.0) < 1e-4
    # the loss and its gradient stay finite too (padded batch of two huge bags, bf16)
    from wsi_mil.mil import mil_loss

    model.train()
    batch = torch.stack([x, x.flip(0)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch, torch.ones(2, 50_000, dtype=torch.bool))
    terms = mil_loss(out, torch.tensor([0, 1]), recall_weight=1.0)
    terms.total.backward()
    assert torch.isfinite(terms.total)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def _bag_with_logits_up_to_80(hidden_dims: tuple[int, ...]) -> tuple[LossAttentionMIL, torch.Tensor]:
    """500 tiles along one direction with scores in [-1, 1], ten of them near the top, and the classifier
    scaled so the largest |logit| is 80: the attention is shared by a few tiles, where rounding shows."""
    torch.manual_seed(0)
    model = LossAttentionMIL(in_dim=32, n_classes=2, hidden_dims=hidden_dims, dropout=0.0).eval()
    g = torch.Generator().manual_seed(1)
    score = torch.cat([1 - 0.01 * torch.arange(10.0), torch.rand(490, generator=g) * 1.8 - 1])
    x = 2 * score[:, None] * torch.randn(32, generator=g) + 0.05 * torch.randn(500, 32, generator=g)
    with torch.no_grad():
        scale = 80.0 / float(model(x).instance_logits.abs().max())
        model.classifier.weight.mul_(scale)
        model.classifier.bias.mul_(scale)
    return model, x


def _attention_of(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(torch.logsumexp(logits.float(), dim=-1), dim=-1)


def test_attention_under_bf16_autocast_matches_float32_within_1e_3_for_logits_up_to_80() -> None:
    model, x = _bag_with_logits_up_to_80(hidden_dims=())  # no MLP: the features are the embeddings
    with torch.no_grad():
        out32 = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out16 = model(x)
            old_logits = model.classifier(x)  # the old way: the shared classifier in bf16, upcast after
    assert 79.9 < float(out32.instance_logits.abs().max()) <= 80.001
    assert float(out32.attention.max()) < 0.5  # several tiles share the attention
    assert old_logits.dtype == torch.bfloat16
    assert out16.instance_logits.dtype == torch.float32 and out16.attention.dtype == torch.float32
    assert float((out16.attention - out32.attention).abs().max()) <= 1e-3
    assert float((out16.bag_logits - out32.bag_logits).abs().max()) <= 1e-3
    # the old way misses the bound by far: bf16 knows a logit near 80 only to +-0.25
    assert float((_attention_of(old_logits) - out32.attention).abs().max()) > 1e-2


@pytest.mark.parametrize("name,kwargs", ALL_MODELS)
def test_under_bf16_autocast_only_the_mlp_runs_in_bf16(name: str, kwargs: dict) -> None:
    """The classifier (and abmil's score layer) sees the bf16 embeddings cast to float32 and runs in float32."""
    if name == "loss_attention":
        model, x = _bag_with_logits_up_to_80(hidden_dims=(64,))
    else:
        torch.manual_seed(0)
        model = create_model(name, in_dim=32, n_classes=2, hidden_dims=(64,), dropout=0.0, **kwargs).eval()
        x = torch.randn(300, 32, generator=torch.Generator().manual_seed(2)) * 3
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = model(x)
        embeddings = model.mlp(x)
    assert embeddings.dtype == torch.bfloat16  # the MLP does run in bf16
    with torch.no_grad():
        logits = model.classifier(embeddings.float())  # float32, autocast off
    assert out16.instance_logits.dtype == torch.float32
    torch.testing.assert_close(out16.instance_logits, logits, rtol=1e-6, atol=1e-5)
    if name == "loss_attention":
        assert float((out16.attention - _attention_of(logits)).abs().max()) <= 1e-6
        torch.testing.assert_close(out16.bag_logits, out16.attention @ logits, rtol=1e-6, atol=1e-4)


def test_gradient_reaches_the_instance_mlp_through_attention_alone() -> None:
    torch.manual_seed(0)
    model = LossAttentionMIL(in_dim=6, n_classes=3, hidden_dims=(10,), dropout=0.0)
    x = torch.randn(9, 6)
    out = model(x)
    # a loss that depends on the bag only through alpha (attention entropy): if alpha were detached,
    # or computed by parameters of its own, the MLP would get no gradient from it
    entropy = -(out.attention * out.attention.clamp_min(1e-12).log()).sum()
    grads = torch.autograd.grad(entropy, [model.mlp[0].weight, model.classifier.weight])
    assert all(g.abs().sum() > 0 for g in grads)
    # and the path really is alpha's: with the instance logits held fixed, alpha's gradient is unchanged
    z = out.instance_logits.detach().requires_grad_(True)
    alpha = torch.softmax(torch.logsumexp(z, -1), 0)
    (-(alpha * alpha.log()).sum()).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_registry_lists_creates_and_rebuilds_from_hparams() -> None:
    assert {"loss_attention", "abmil", "mean", "max"} <= set(list_models())
    model = create_model("abmil", in_dim=5, n_classes=2, gated=True, attention_dim=7, hidden_dims=(4,))
    assert model.hparams["name"] == "abmil" and model.hparams["gated"] is True
    rebuilt = create_model(**model.hparams)
    assert type(rebuilt) is type(model) and rebuilt.hparams == model.hparams
    rebuilt.load_state_dict(model.state_dict())  # same parameter layout
    with pytest.raises(ConfigError, match="loss_attention"):
        create_model("transmil", in_dim=5, n_classes=2)
    with pytest.raises(ConfigError):
        create_model("mean", in_dim=5, n_classes=2, heads=3)
    with pytest.raises(ConfigError):
        create_model("mean", in_dim=5, n_classes=1)


def test_bad_shapes_raise_input_errors() -> None:
    model = _model()
    with pytest.raises(InputError, match="dimension"):
        model(torch.randn(4, 11, dtype=torch.float64))
    with pytest.raises(InputError, match="no instances"):
        model(torch.randn(0, 12, dtype=torch.float64))
    with pytest.raises(InputError, match="mask"):
        model(torch.randn(2, 4, 12, dtype=torch.float64), torch.ones(2, 5, dtype=torch.bool))
