"""The objective's terms against hand-computed values, batch == bag-by-bag, and the temporal ensemble."""

from __future__ import annotations

import io
import math

import pytest
import torch

from wsi_mil.errors import ConfigError, InputError
from wsi_mil.mil import MILOutput, TemporalEnsemble, consistency_ramp, create_model, mil_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- a tiny example computed by hand (plain Python math, no torch) ---------------------------------
# two instances, two classes, label 0: z_1 = (1, 0), z_2 = (0, 2)
Z_INSTANCE = [[1.0, 0.0], [0.0, 2.0]]
E = math.e
ALPHA = [(E + 1) / (E + 1 + 1 + E**2), (1 + E**2) / (E + 1 + 1 + E**2)]  # softmax_t logsumexp_c z_tc
BAG = [ALPHA[0] * 1.0 + ALPHA[1] * 0.0, ALPHA[0] * 0.0 + ALPHA[1] * 2.0]  # sum_t alpha_t z_t
BAG_CE = math.log(math.exp(BAG[0]) + math.exp(BAG[1])) - BAG[0]
INSTANCE_CE = [math.log(E + 1) - 1.0, math.log(1 + E**2) - 0.0]
TARGET = [0.5, 0.5]


def _tiny_output() -> MILOutput:
    z = torch.tensor(Z_INSTANCE, dtype=torch.float64)
    alpha = torch.softmax(torch.logsumexp(z, -1), 0)
    return MILOutput(bag_logits=alpha @ z, instance_logits=z, attention=alpha)


def test_tiny_example_numbers_are_what_we_think() -> None:
    assert ALPHA[0] == pytest.approx(0.307110, abs=1e-6)
    assert BAG == pytest.approx([0.307110, 1.385780], abs=1e-6)
    assert BAG_CE == pytest.approx(math.log(1 + math.exp(1.385780 - 0.307110)), abs=1e-5)
    out = _tiny_output()
    assert out.attention.tolist() == pytest.approx(ALPHA, abs=1e-12)
    assert out.bag_logits.tolist() == pytest.approx(BAG, abs=1e-12)


def test_each_term_matches_the_hand_computed_value() -> None:
    lam, omega = 0.7, 3.0
    terms = mil_loss(
        _tiny_output(),
        0,
        recall_weight=lam,
        consistency_weight=omega,
        attention_target=torch.tensor(TARGET, dtype=torch.float64),
    )
    recall = lam * (ALPHA[0] * INSTANCE_CE[0] + ALPHA[1] * INSTANCE_CE[1])
    consistency = omega * ((ALPHA[0] - TARGET[0]) ** 2 + (ALPHA[1] - TARGET[1]) ** 2)
    assert float(terms.bag_ce) == pytest.approx(BAG_CE, abs=1e-10)
    assert float(terms.recall) == pytest.approx(recall, abs=1e-10)
    assert float(terms.consistency) == pytest.approx(consistency, abs=1e-10)
    assert float(terms.total) == pytest.approx(BAG_CE + recall + consistency, abs=1e-10)
    assert terms.as_floats()["loss"] == pytest.approx(BAG_CE + recall + consistency)


def test_class_weights_scale_the_bag_cross_entropy_only() -> None:
    terms = mil_loss(_tiny_output(), 0, recall_weight=1.0, class_weights=torch.tensor([2.5, 1.0]))
    assert float(terms.bag_ce) == pytest.approx(2.5 * BAG_CE, abs=1e-6)
    assert float(terms.recall) == pytest.approx(
        ALPHA[0] * INSTANCE_CE[0] + ALPHA[1] * INSTANCE_CE[1], abs=1e-6
    )


def test_terms_are_zero_when_not_asked_for_and_at_the_first_epoch() -> None:
    out = _tiny_output()
    target = torch.tensor(TARGET, dtype=torch.float64)
    assert float(mil_loss(out, 0).recall) == 0.0
    assert float(mil_loss(out, 0, consistency_weight=5.0).consistency) == 0.0  # no target yet
    assert float(mil_loss(out, 0, attention_target=target).consistency) == 0.0  # omega = 0
    ensemble = TemporalEnsemble(omega_max=5.0, rampup_epochs=3)
    assert ensemble.target("bag") is None and ensemble.weight() == 0.0  # epoch 0
    terms = mil_loss(out, 0, consistency_weight=ensemble.weight(), attention_target=ensemble.target("bag"))
    assert float(terms.consistency) == 0.0
    no_instances = MILOutput(out.bag_logits, None, out.attention)
    assert float(mil_loss(no_instances, 0, recall_weight=2.0).recall) == 0.0


def test_recall_does_not_grow_with_bag_size_sum_form() -> None:
    # every instance identical: L2 = lambda * CE(z, y) whatever n is (sum_t alpha_t = 1)
    for n in (1, 10, 1000):
        z = torch.tensor([[0.3, -0.2]]).expand(n, 2)
        alpha = torch.full((n,), 1.0 / n)
        out = MILOutput(alpha @ z, z, alpha)
        expected = 2.0 * (math.log(math.exp(0.3) + math.exp(-0.2)) - (-0.2))
        assert float(mil_loss(out, 1, recall_weight=2.0).recall) == pytest.approx(expected, rel=1e-5)


def test_padded_batch_loss_and_gradients_equal_the_mean_of_single_bags() -> None:
    torch.manual_seed(0)
    model = create_model("loss_attention", in_dim=7, n_classes=3, hidden_dims=(11,), dropout=0.0).double()
    lengths, labels = [4, 9, 1, 6], [2, 0, 1, 2]
    bags = [torch.randn(n, 7, dtype=torch.float64) for n in lengths]
    targets = [torch.softmax(torch.randn(n, dtype=torch.float64), 0) for n in lengths]
    kwargs = {"recall_weight": 0.8, "consistency_weight": 2.0}

    singles, single_grads = [], []
    for bag, y, target in zip(bags, labels, targets, strict=True):
        model.zero_grad()
        terms = mil_loss(model(bag), y, attention_target=target, **kwargs)
        terms.total.backward()
        singles.append(terms)
        single_grads.append([p.grad.clone() for p in model.parameters()])

    batch = torch.randn(4, 9, 7, dtype=torch.float64) * 100  # garbage in the padding
    mask = torch.zeros(4, 9, dtype=torch.bool)
    target = torch.full((4, 9), 7.0, dtype=torch.float64)  # garbage target on padding too
    for i, (bag, t) in enumerate(zip(bags, targets, strict=True)):
        batch[i, : len(bag)], mask[i, : len(bag)], target[i, : len(bag)] = bag, True, t
    model.zero_grad()
    terms = mil_loss(model(batch, mask), torch.tensor(labels), mask=mask, attention_target=target, **kwargs)
    terms.total.backward()
    for name in ("total", "bag_ce", "recall", "consistency"):
        expected = torch.stack([getattr(s, name) for s in singles]).mean()
        torch.testing.assert_close(getattr(terms, name), expected, rtol=1e-10, atol=1e-12)
    for p, *grads in zip(model.parameters(), *single_grads, strict=True):
        torch.testing.assert_close(p.grad, torch.stack(grads).mean(0), rtol=1e-9, atol=1e-12)
    per_bag = mil_loss(model(batch, mask), torch.tensor(labels), mask=mask, reduction="none", **kwargs)
    assert per_bag.total.shape == (4,)


def test_target_valid_switches_consistency_off_per_bag() -> None:
    out = MILOutput(torch.zeros(2, 2), torch.zeros(2, 3, 2), torch.tensor([[0.2, 0.8, 0.0], [0.5, 0.5, 0.0]]))
    target = torch.tensor([[0.5, 0.5, 0.0], [float("nan")] * 3])
    terms = mil_loss(
        out,
        torch.tensor([0, 1]),
        consistency_weight=1.0,
        attention_target=target,
        target_valid=torch.tensor([True, False]),
        reduction="none",
    )
    assert terms.consistency.tolist() == pytest.approx([0.18, 0.0])


def test_loss_argument_errors() -> None:
    out = _tiny_output()
    with pytest.raises(ConfigError):
        mil_loss(out, 0, recall_weight=-1.0)
    with pytest.raises(ConfigError):
        mil_loss(out, 0, reduction="max")  # type: ignore[arg-type]
    with pytest.raises(InputError):
        mil_loss(out, 0, consistency_weight=1.0, attention_target=torch.ones(3))


def test_alpha_is_not_detached_in_recall_and_consistency() -> None:
    torch.manual_seed(0)
    model = create_model("loss_attention", in_dim=4, n_classes=2, hidden_dims=(5,), dropout=0.0)
    x = torch.randn(6, 4)
    out = model(x)
    # only the attention-weighted terms, through alpha: consistency against a fixed target
    terms = mil_loss(out, 1, consistency_weight=1.0, attention_target=torch.full((6,), 1 / 6))
    grad = torch.autograd.grad(terms.consistency, model.mlp[0].weight)[0]
    assert grad.abs().sum() > 0


# --- temporal ensemble -------------------------------------------------------------------------------
def test_bias_correction_matches_hand_computed_values() -> None:
    beta = 0.6
    ensemble = TemporalEnsemble(beta=beta, omega_max=1.0)
    a0, a1, a2 = [0.2, 0.8], [0.6, 0.4], [0.1, 0.9]
    ensemble.record("s1", torch.tensor(a0))
    assert ensemble.target("s1") is None  # staged, not committed: still epoch 0
    ensemble.end_epoch()
    # A = 0.4 a0 ; corrected by 1 - 0.6 = 0.4 -> a0
    assert ensemble.target("s1").tolist() == pytest.approx(a0, abs=1e-6)
    ensemble.record("s1", torch.tensor(a1))
    ensemble.end_epoch()
    expected = [
        (beta * (1 - beta) * x0 + (1 - beta) * x1) / (1 - beta**2) for x0, x1 in zip(a0, a1, strict=True)
    ]
    assert expected == pytest.approx([0.45, 0.55], abs=1e-12)  # (0.6*0.4*0.2 + 0.4*0.6) / 0.64 = 0.45
    assert ensemble.target("s1").tolist() == pytest.approx(expected, abs=1e-6)
    ensemble.record("s1", torch.tensor(a2))
    ensemble.end_epoch()
    a_raw = [
        beta**2 * (1 - beta) * x0 + beta * (1 - beta) * x1 + (1 - beta) * x2
        for x0, x1, x2 in zip(a0, a1, a2, strict=True)
    ]
    assert ensemble.target("s1").tolist() == pytest.approx([v / (1 - beta**3) for v in a_raw], abs=1e-6)
    assert ensemble.epoch == 3 and "s1" in ensemble and ensemble.target("other") is None


def test_ramp_matches_hand_computed_values() -> None:
    assert consistency_ramp(1, 10.0, 4) == pytest.approx(10.0 * math.exp(-5 * 0.75**2), rel=1e-12)
    assert consistency_ramp(1, 10.0, 4) == pytest.approx(0.600547, abs=1e-5)
    assert consistency_ramp(2, 10.0, 4) == pytest.approx(10.0 * math.exp(-1.25), rel=1e-12)
    assert consistency_ramp(4, 10.0, 4) == 10.0
    assert consistency_ramp(9, 10.0, 4) == 10.0
    assert consistency_ramp(3, 2.0, 0) == 2.0
    ensemble = TemporalEnsemble(omega_max=10.0, rampup_epochs=4)
    assert ensemble.weight(0) == 0.0  # no target at the first epoch
    assert ensemble.weight(1) == pytest.approx(0.600547, abs=1e-5)


def test_subsampled_tiles_are_indexed_by_tile_index() -> None:
    ensemble = TemporalEnsemble(beta=0.6, omega_max=1.0)
    ensemble.record("s", torch.tensor([0.5, 0.3, 0.2]), tile_index=torch.tensor([0, 4, 7]))
    ensemble.end_epoch()
    target = ensemble.target("s", torch.tensor([4, 7]))
    assert target.tolist() == pytest.approx([0.6, 0.4], abs=1e-6)  # renormalised over the subset
    # a tile never seen takes the mean of the seen ones before renormalising
    target = ensemble.target("s", torch.tensor([0, 4, 9]))
    assert target.tolist() == pytest.approx([0.5 / 1.2, 0.3 / 1.2, 0.4 / 1.2], abs=1e-6)
    assert ensemble.target("s", torch.tensor([1, 2])) is None  # nothing seen in that subset
    # second epoch, other tiles: each tile keeps its own bias correction
    ensemble.record("s", torch.tensor([0.9, 0.1]), tile_index=torch.tensor([7, 2]))
    ensemble.end_epoch()
    t7 = (0.6 * 0.4 * 0.2 + 0.4 * 0.9) / (1 - 0.6**2)
    target = ensemble.target("s", torch.tensor([7, 2]))
    assert target.tolist() == pytest.approx([t7 / (t7 + 0.1), 0.1 / (t7 + 0.1)], abs=1e-6)
    with pytest.raises(InputError):
        ensemble.record("s", torch.tensor([1.0, 0.0]), tile_index=torch.tensor([1]))


def test_whole_bag_size_must_not_change_without_tile_index() -> None:
    ensemble = TemporalEnsemble()
    ensemble.record("s", torch.tensor([0.5, 0.5]))
    ensemble.end_epoch()
    with pytest.raises(InputError, match="tile_index"):
        ensemble.record("s", torch.tensor([0.2, 0.3, 0.5]))


def test_state_dict_round_trip_with_safe_loading() -> None:
    ensemble = TemporalEnsemble(beta=0.6, omega_max=4.0, rampup_epochs=5)
    ensemble.record("a", torch.tensor([0.1, 0.9]))
    ensemble.record("b", torch.tensor([1.0]))
    ensemble.end_epoch()
    buffer = io.BytesIO()
    torch.save(ensemble.state_dict(), buffer)
    buffer.seek(0)
    restored = TemporalEnsemble()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert (
        restored.epoch == 1
        and restored.omega_max == 4.0
        and restored.rampup_epochs == 5
        and len(restored) == 2
    )
    for key in ("a", "b"):
        torch.testing.assert_close(restored.target(key), ensemble.target(key))
    assert restored.weight(3) == ensemble.weight(3)


def test_ensemble_rejects_bad_settings() -> None:
    with pytest.raises(ConfigError):
        TemporalEnsemble(beta=1.0)
    with pytest.raises(ConfigError):
        TemporalEnsemble(omega_max=-1.0)
