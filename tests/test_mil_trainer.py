"""The training engine: learning, reproducibility, early stopping, batches, resume, prediction."""

from __future__ import annotations

import copy
import io
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsi_mil.errors import CheckpointError, ConfigError
from wsi_mil.mil import (
    BAG_CE_ONLY,
    Bag,
    InMemoryBagDataset,
    ObjectiveSettings,
    Trainer,
    TrainerCallback,
    TrainerConfig,
    TrainingError,
    create_model,
    mil_loss,
    seed_everything,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


D = 8


def planted_bags(n_bags: int, seed: int, n_min: int = 6, n_max: int = 20) -> InMemoryBagDataset:
    """Positive bags hold 1-3 instances whose feature 0 is shifted by +4; negatives hold none."""
    g = torch.Generator().manual_seed(seed)
    bags = []
    for i in range(n_bags):
        n = int(torch.randint(n_min, n_max + 1, (1,), generator=g))
        x = torch.randn(n, D, generator=g)
        label = i % 2
        if label:
            k = int(torch.randint(1, 4, (1,), generator=g))
            x[:k, 0] += 4.0
        bags.append(Bag(key=f"s{seed}-{i}", features=x, label=label))
    return InMemoryBagDataset(bags)


def _model(name: str = "loss_attention", dropout: float = 0.0, seed: int = 0):
    seed_everything(seed)
    return create_model(name, in_dim=D, n_classes=2, hidden_dims=(16,), dropout=dropout)


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ["loss_attention", "abmil"])
def test_learns_a_trivially_separable_planted_problem(name: str) -> None:
    train, val = planted_bags(40, seed=1), planted_bags(30, seed=2)
    objective = {"recall_weight": 0.5, "consistency_max": 0.0} if name == "loss_attention" else {}
    trainer = Trainer(_model(name), TrainerConfig(epochs=12, lr=2e-3, weight_decay=1e-4, **objective))
    before = trainer.evaluate(val)
    result = trainer.fit(train)
    after = trainer.evaluate(val)
    assert after["auc"] >= 0.97 and after["accuracy"] >= 0.9
    assert after["loss"] < before["loss"]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    # the attention finds the planted instances of positive bags
    predictions = trainer.predict(val)
    shares = []
    for bag, pred in zip(val, predictions, strict=True):
        if bag.label == 1:
            planted = bag.features[:, 0].numpy() > 2.5
            shares.append(pred.attention[planted].sum())
    assert np.mean(shares) > 0.6


def test_history_records_every_term_and_consistency_is_zero_at_the_first_epoch() -> None:
    train, val = planted_bags(10, seed=3), planted_bags(6, seed=4)
    config = TrainerConfig(epochs=3, lr=1e-3, recall_weight=0.3, consistency_max=50.0, rampup_epochs=2)
    result = Trainer(_model(), config).fit(train, val)
    first, second, third = result.history
    assert first["consistency_weight"] == 0.0 and first["train_consistency"] == 0.0
    assert second["consistency_weight"] == pytest.approx(50.0 * np.exp(-5 * 0.25))
    assert second["train_consistency"] > 0.0 and third["consistency_weight"] == 50.0
    for key in (
        "train_loss", "train_bag_ce", "train_recall", "train_consistency",
        "val_loss", "val_bag_ce", "val_recall", "val_auc", "val_accuracy", "epoch_seconds", "lr",
    ):  # fmt: skip
        assert key in first and np.isfinite(first[key])
    assert first["train_loss"] == pytest.approx(
        first["train_bag_ce"] + first["train_recall"] + first["train_consistency"]
    )
    assert first["val_loss"] == pytest.approx(first["val_bag_ce"] + first["val_recall"])


def test_seeded_runs_are_reproducible() -> None:
    train = planted_bags(12, seed=5, n_max=30)
    config = TrainerConfig(
        epochs=3, lr=1e-3, seed=7, recall_weight=0.2, consistency_max=2.0, rampup_epochs=1,
        max_instances=10, deterministic=True,
    )  # fmt: skip
    runs = []
    for _ in range(2):
        trainer = Trainer(_model(dropout=0.3, seed=11), config)
        history = trainer.fit(train).history
        runs.append(
            ([{k: v for k, v in r.items() if k != "epoch_seconds"} for r in history], _params(trainer.model))
        )
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1], runs[1][1], strict=True):
        assert torch.equal(a, b)
    # and another seed really gives another run
    other = Trainer(_model(dropout=0.3, seed=11), TrainerConfig(**{**config.__dict__, "seed": 8}))
    other.fit(train)
    assert not all(torch.equal(a, b) for a, b in zip(runs[0][1], _params(other.model), strict=True))


class _Snapshots(TrainerCallback):
    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []
        self.events: list[str] = []

    def on_fit_start(self, trainer: Trainer) -> None:
        self.events.append("fit_start")

    def on_epoch_end(self, trainer: Trainer, record: dict[str, float]) -> None:
        self.states.append(copy.deepcopy(trainer.model.state_dict()))
        self.events.append("epoch_end")

    def on_fit_end(self, trainer: Trainer, result: object) -> None:
        self.events.append("fit_end")


def test_early_stopping_keeps_and_restores_the_best_state() -> None:
    train = planted_bags(30, seed=6)
    # validation labels flipped: the better the model fits the training bags, the worse val_loss gets
    val = InMemoryBagDataset(
        Bag(key=b.key, features=b.features, label=1 - int(b.label)) for b in planted_bags(20, seed=7)
    )
    snapshots = _Snapshots()
    config = TrainerConfig(epochs=30, lr=3e-3, early_stopping_patience=3, monitor="val_loss")
    trainer = Trainer(_model(), config, callbacks=[snapshots])
    result = trainer.fit(train, val)
    val_losses = [r["val_loss"] for r in result.history]
    assert result.stopped_early and result.epochs_run < 30
    assert result.best_epoch == int(np.argmin(val_losses))
    assert result.epochs_run == result.best_epoch + 1 + 3  # patience epochs after the best
    assert result.best_metric == pytest.approx(min(val_losses))
    best = snapshots.states[result.best_epoch]
    last = snapshots.states[-1]
    assert any(not torch.equal(best[k], last[k]) for k in best)
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, best[key])
    assert trainer.evaluate(val)["loss"] == pytest.approx(min(val_losses), rel=1e-5)
    assert snapshots.events[0] == "fit_start" and snapshots.events[-1] == "fit_end"


def test_early_stopping_on_auc_maximises() -> None:
    train, val = planted_bags(20, seed=8), planted_bags(20, seed=9)
    result = Trainer(_model(), TrainerConfig(epochs=4, lr=2e-3, monitor="val_auc")).fit(train, val)
    aucs = [r["val_auc"] for r in result.history]
    assert result.best_metric == max(aucs) and result.best_epoch == int(np.argmax(aucs))


def test_a_batch_step_equals_adam_on_the_mean_of_single_bag_gradients() -> None:
    train = planted_bags(4, seed=10)
    model = _model()
    reference = copy.deepcopy(model)
    config = TrainerConfig(epochs=1, batch_size=4, lr=1e-2, weight_decay=1e-3, recall_weight=0.7)
    Trainer(model, config).fit(train)  # one step on a padded batch of 4 bags

    grads = [torch.zeros_like(p) for p in reference.parameters()]
    for bag in train:
        reference.zero_grad()
        mil_loss(reference(bag.features), bag.label, recall_weight=0.7).total.backward()
        for g, p in zip(grads, reference.parameters(), strict=True):
            g += p.grad / len(train)
    optimizer = torch.optim.Adam(reference.parameters(), lr=1e-2, weight_decay=1e-3)
    for g, p in zip(grads, reference.parameters(), strict=True):
        p.grad = g
    optimizer.step()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_predict_gives_probabilities_attention_and_tile_probabilities() -> None:
    bags = planted_bags(3, seed=11)
    tiles = Bag(key="t", features=bags[0].features, label=None, tile_index=torch.arange(len(bags[0])) * 3)
    data = InMemoryBagDataset([*bags, tiles])
    predictions = Trainer(_model("max")).predict(data)
    assert [p.key for p in predictions] == [b.key for b in data]
    for bag, pred in zip(data, predictions, strict=True):
        assert pred.bag_probabilities.shape == (2,) and pred.bag_probabilities.sum() == pytest.approx(1.0)
        assert pred.attention.shape == (len(bag),) and pred.attention.sum() == pytest.approx(1.0, abs=1e-5)
        assert pred.instance_probabilities is not None and pred.instance_probabilities.shape == (len(bag), 2)
    assert predictions[-1].label is None and predictions[-1].tile_index.tolist() == tiles.tile_index.tolist()


def test_max_instances_subsampling_indexes_the_ensemble_by_tile() -> None:
    bags = planted_bags(6, seed=12, n_min=30, n_max=40)
    big = [
        Bag(key=b.key, features=b.features, label=b.label, tile_index=torch.arange(len(b)) + 100)
        for b in bags
    ]
    config = TrainerConfig(epochs=3, lr=1e-3, consistency_max=1.0, rampup_epochs=1, max_instances=8)
    trainer = Trainer(_model(), config)
    history = trainer.fit(InMemoryBagDataset(big)).history
    assert history[1]["train_consistency"] > 0
    for bag in big:
        stored = trainer.ensemble.target(bag.key, bag.tile_index)
        assert stored is not None and stored.shape == (len(bag),)  # whole bag addressable by tile index


def test_resume_from_state_dict_continues_identically() -> None:
    train = planted_bags(10, seed=13)
    config = TrainerConfig(epochs=4, lr=1e-3, consistency_max=1.0, rampup_epochs=2, recall_weight=0.2)
    straight = Trainer(_model(dropout=0.2, seed=3), config)
    straight.fit(train)

    first = Trainer(_model(dropout=0.2, seed=3), TrainerConfig(**{**config.__dict__, "epochs": 2}))
    first.fit(train)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = Trainer(_model(dropout=0.2, seed=99), config)
    torch.manual_seed(12345)  # the resumed trainer restores the RNG state itself
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    resumed.fit(train)
    assert resumed.epoch == 4 and len(resumed.history) == 4
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    other = Trainer(create_model("mean", in_dim=D, n_classes=2), TrainerConfig(epochs=4, lr=1e-3))
    with pytest.raises(CheckpointError):
        other.load_state_dict(first.state_dict())


def test_callback_can_stop_training() -> None:
    class StopAfterTwo(TrainerCallback):
        def __init__(self) -> None:
            self.steps = 0

        def on_batch_end(self, trainer: Trainer, step: int, n_bags: int) -> None:
            self.steps += 1

        def on_epoch_end(self, trainer: Trainer, record: dict[str, float]) -> None:
            trainer.stop_requested = record["epoch"] >= 1

    callback = StopAfterTwo()
    result = Trainer(_model(), TrainerConfig(epochs=10, batch_size=3), [callback]).fit(
        planted_bags(7, seed=14)
    )
    assert result.epochs_run == 2 and callback.steps == 2 * 3


def test_bad_settings_and_diverging_training_raise() -> None:
    with pytest.raises(ConfigError):
        TrainerConfig(lr=0.0)
    with pytest.raises(ConfigError):
        TrainerConfig(monitor="val_f1")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        TrainerConfig(device="tpu")
    with pytest.raises(ConfigError):
        Trainer(_model(), TrainerConfig(early_stopping_patience=2)).fit(planted_bags(4, seed=15))
    with pytest.raises(ConfigError):
        Trainer(_model(), TrainerConfig(class_weights=(1.0, 2.0, 3.0)))
    broken = Bag(key="nan", features=torch.full((3, D), float("nan")), label=1)
    with pytest.raises(TrainingError, match="nan"):
        Trainer(_model(), TrainerConfig(epochs=1)).fit(InMemoryBagDataset([broken]))


def test_dataloader_workers_give_the_same_training() -> None:
    train = planted_bags(8, seed=16)
    runs = []
    for workers in (0, 1):
        trainer = Trainer(_model(seed=2), TrainerConfig(epochs=2, lr=1e-3, batch_size=3, num_workers=workers))
        trainer.fit(train)
        runs.append(_params(trainer.model))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_the_default_objective_is_loss_attentions_one_source_and_only_loss_attentions() -> None:
    default = Trainer(_model(), TrainerConfig()).objective
    assert default == ObjectiveSettings() and default.recall_weight > 0 and not default.uses_ensemble  # omega_max 0: off
    assert Trainer(_model(), TrainerConfig(recall_weight=0.3)).objective == ObjectiveSettings(recall_weight=0.3)
    for name in ("abmil", "mean", "max"):
        trainer = Trainer(_model(name), TrainerConfig())
        assert trainer.objective == BAG_CE_ONLY and not trainer.objective.uses_ensemble
        assert trainer.objective.recall_weight == 0.0 and trainer.ensemble.omega_max == 0.0
    for key, value in (("recall_weight", 0.3), ("consistency_max", 1.0), ("rampup_epochs", 3), ("ema_beta", 0.5)):
        with pytest.raises(ConfigError, match=f"^{key} is an option of loss_attention only; model 'abmil'"):
            Trainer(_model("abmil"), TrainerConfig(**{key: value}))
    with pytest.raises(ConfigError, match="recall_weight"):
        TrainerConfig(recall_weight=-0.1)  # ranges are checked for every model


@pytest.mark.parametrize(
    "given,lam,omega_max",
    [({}, 1.0, 0.0), ({"recall_weight": 0.5, "consistency_max": 5.0}, 0.5, 5.0)],
    ids=["defaults", "with-consistency"],
)
def test_objective_trains_exactly_as_loss_attention_written_out_by_hand(given, lam, omega_max) -> None:
    """TrainerConfig() with no objective setting: lambda 1, omega_max 0 (the whole-slide ablation's choice:
    no consistency term); and lambda 0.5 with omega_max 5 ramped over 10 epochs, beta 0.6. Each term and the
    bias-corrected temporal ensemble are computed here from shared/method.md."""
    ramp, beta = 10, 0.6
    assert (ObjectiveSettings().recall_weight, ObjectiveSettings().consistency_max) == (1.0, 0.0)
    train = planted_bags(6, seed=17)
    epochs = 4
    model = _model()
    reference = copy.deepcopy(model)
    history = Trainer(model, TrainerConfig(epochs=epochs, lr=1e-3, **given)).fit(train).history

    optimizer = torch.optim.Adam(reference.parameters(), lr=1e-3, weight_decay=1e-5)  # TrainerConfig's
    order = torch.Generator().manual_seed(0)  # the trainer's bag order (seed 0)
    ema: dict[str, torch.Tensor] = {}
    for m in range(epochs):
        omega = 0.0 if m == 0 else omega_max * math.exp(-5 * (1 - min(m, ramp) / ramp) ** 2)
        staged, total, consistency = {}, 0.0, 0.0
        for i in torch.randperm(len(train), generator=order).tolist():
            bag = train[i]
            label = torch.tensor([bag.label])
            z = reference.classifier(reference.mlp(bag.features))
            alpha = torch.softmax(torch.logsumexp(z, dim=1), dim=0)
            loss = F.cross_entropy((alpha[:, None] * z).sum(0, keepdim=True), label)
            loss = loss + lam * (alpha * F.cross_entropy(z, label.expand(len(z)), reduction="none")).sum()
            if m > 0 and omega_max > 0:
                l3 = omega * (alpha - ema[bag.key] / (1 - beta**m)).square().sum()
                loss, consistency = loss + l3, consistency + float(l3.detach())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            staged[bag.key] = alpha.detach()
            total += float(loss.detach())
        for key, alpha in staged.items():
            ema[key] = beta * ema.get(key, torch.zeros_like(alpha)) + (1 - beta) * alpha
        record = history[m]
        assert record["consistency_weight"] == pytest.approx(omega if omega_max > 0 else 0.0)
        assert record["train_loss"] == pytest.approx(total / len(train), rel=1e-5)
        assert record["train_consistency"] == pytest.approx(consistency / len(train), rel=1e-4, abs=1e-9)
    assert history[-1]["train_recall"] > 0
    assert (history[-1]["train_consistency"] > 0) == (omega_max > 0)
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_baselines_train_with_the_bag_cross_entropy_alone() -> None:
    train = planted_bags(6, seed=18)
    for name in ("abmil", "mean", "max"):
        model = _model(name)
        reference = copy.deepcopy(model)
        history = Trainer(model, TrainerConfig(epochs=2, lr=1e-3)).fit(train).history
        assert all(r["train_recall"] == 0 and r["train_consistency"] == 0 for r in history)
        assert all(r["train_loss"] == r["train_bag_ce"] for r in history)
        optimizer = torch.optim.Adam(reference.parameters(), lr=1e-3, weight_decay=1e-5)
        order = torch.Generator().manual_seed(0)
        for _ in range(2):
            for i in torch.randperm(len(train), generator=order).tolist():
                loss = F.cross_entropy(reference(train[i].features).bag_logits[None], torch.tensor([train[i].label]))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        for a, b in zip(model.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_state_dict_records_the_resolved_objective() -> None:
    trainer = Trainer(_model("mean"), TrainerConfig(epochs=1))
    assert trainer.state_dict()["objective"] == asdict(BAG_CE_ONLY)
