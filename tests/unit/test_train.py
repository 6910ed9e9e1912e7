"""The training loop: clipping bounds the update, loss falls, non-finite loss stops, seeding,
fine-tuning on the most recent windows."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.conftest import synthetic_series
from training.config import load_config
from training.model import Forecaster, ModelConfig
from training.train import (
    TrainConfig,
    TrainingError,
    _pack,
    clip_gradients,
    fit_scaling,
    member_seeds,
    pinball_loss,
    scaled_config,
    train_forecaster,
    train_model,
)

SMALL = TrainConfig(window=96, batch_size=32, max_epochs=5, stride=4, burn_in=12, min_epoch_steps=1, lr=5e-3, seed=3)


def small_model(series, **kw):
    torch.manual_seed(0)
    return Forecaster(scaled_config(ModelConfig(hidden_size=16, num_layers=1, horizon=6, **kw), series))


def test_clipping_bounds_the_applied_update_under_an_exploding_gradient():
    series = [synthetic_series(n=48 * 10)]
    model = small_model(series)
    before = [p.detach().clone() for p in model.parameters()]
    values = torch.tensor(series[0].values[None, :96])
    ts = torch.tensor(series[0].timestamps_ms[None, :96])
    loss = model.forecast_all_z(values, ts).pow(2).mean() * 1e12  # an exploding gradient
    loss.backward()
    params = list(model.parameters())
    pre_norm, clipped = clip_gradients(params, clip_norm=0.5, clip_value=None)
    assert clipped and pre_norm > 1e6
    assert float(torch.nn.utils.get_total_norm([p.grad for p in params])) == pytest.approx(0.5, rel=1e-4)
    lr = 0.1
    torch.optim.SGD(params, lr=lr).step()
    moved = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(params, before)))
    assert moved.item() <= lr * 0.5 * (1 + 1e-4)  # the applied update is bounded by lr * clip_norm


def test_value_clipping_bounds_each_element():
    series = [synthetic_series(n=48 * 10)]
    model = small_model(series)
    (
        model.forecast_all_z(
            torch.tensor(series[0].values[None, :48]), torch.tensor(series[0].timestamps_ms[None, :48])
        ).sum()
        * 1e9
    ).backward()
    _, clipped = clip_gradients(list(model.parameters()), clip_norm=0.0, clip_value=1e-3)
    assert clipped
    assert max(p.grad.abs().max().item() for p in model.parameters()) <= 1e-3 * (1 + 1e-6)  # float32 of 1e-3


def test_loss_falls_on_a_seasonal_series_and_clipping_is_logged():
    series = [synthetic_series(n=48 * 30)]
    model = small_model(series)
    seen = []
    result = train_model(model, series, SMALL, on_epoch=lambda e, m: seen.append((e, m)), progress=False)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.6 * losses[0]
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]
    epochs, passes = len(result.history), len(result.finetune)
    assert passes == SMALL.finetune_passes == 3
    assert [e for e, _ in seen] == list(range(1, epochs + passes + 1))  # fine-tuning passes numbered on
    for key in ("grad_norm_mean", "grad_norm_max", "clipped_share", "lr", "val_loss"):
        assert np.isfinite(seen[0][1][key])
    assert 0.0 <= seen[0][1]["clipped_share"] <= 1.0
    tuned = seen[epochs][1]
    assert set(tuned) == {f"finetune_{k}" for k in ("loss", "grad_norm_mean", "grad_norm_max", "clipped_share", "lr")}
    assert tuned["finetune_lr"] == SMALL.finetune_lr and np.isfinite(tuned["finetune_loss"])


def test_fine_tuning_sees_the_windows_whose_targets_reach_the_validation_stretch():
    n, horizon = 48 * 30, 6
    series = [synthetic_series(n=n)]
    model = small_model(series)
    train_w, _, recent_w = _pack(model, series, SMALL)
    val_start = n - int(np.ceil(SMALL.val_fraction * n))
    last_target = recent_w.starts + SMALL.window - 1 + horizon  # of each recent window
    assert len(recent_w.starts) and (last_target >= val_start).all() and (last_target <= n - 1).all()
    assert (train_w.starts + SMALL.window - 1 + horizon < val_start).all()  # train windows stay before it
    every = np.arange(0, n - horizon - SMALL.window + 1, SMALL.stride)  # train-layout windows, all data
    assert np.array_equal(recent_w.starts, every[every + SMALL.window - 1 + horizon >= val_start])
    assert (recent_w.loss_from == SMALL.burn_in).all() and (recent_w.loss_to == SMALL.window).all()


def test_fine_tuning_moves_the_chosen_weights_and_leaves_the_epochs_alone():
    series = [synthetic_series(n=48 * 12)]
    cfg = TrainConfig(window=96, batch_size=32, max_epochs=3, stride=24, burn_in=12, min_epoch_steps=1, seed=11)
    plain, tuned = small_model(series), small_model(series)
    r_plain = train_model(plain, series, replace(cfg, finetune_passes=0), progress=False)
    r_tuned = train_model(tuned, series, cfg, progress=False)
    assert r_plain.history == r_tuned.history and r_plain.finetune == [] and len(r_tuned.finetune) == 3
    assert r_tuned.summary()["finetune_passes"] == 3
    assert any(not torch.equal(a, b) for a, b in zip(plain.parameters(), tuned.parameters()))
    with pytest.raises(ValueError, match="finetune_passes"):
        TrainConfig(finetune_passes=-1)


def test_an_epoch_longer_than_the_budget_stops_at_the_deadline():
    series = [synthetic_series(n=48 * 12)]
    model = small_model(series)
    cfg = replace(SMALL, min_epoch_steps=10_000, max_epochs=3, finetune_passes=1)  # one epoch: minutes
    started = time.monotonic()
    result = train_model(model, series, cfg, progress=False, deadline=time.monotonic() + 1.0)
    assert time.monotonic() - started < 60
    assert len(result.history) == 1 and result.stop_reason == "budget"
    assert "cut_short" not in result.history[0] and len(result.finetune) == 1


def test_training_is_reproducible_with_a_seed():
    series = [synthetic_series(n=48 * 12)]
    cfg = TrainConfig(window=96, batch_size=32, max_epochs=2, stride=24, burn_in=12, min_epoch_steps=1, seed=11)
    a, b = small_model(series), small_model(series)
    ra, rb = train_model(a, series, cfg, progress=False), train_model(b, series, cfg, progress=False)
    assert ra.history == rb.history
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_non_finite_loss_stops_with_epoch_and_step():
    series = [synthetic_series(n=48 * 12)]
    model = small_model(series)
    with torch.no_grad():
        model.head.bias.fill_(float("nan"))
    with pytest.raises(TrainingError, match=r"non-finite loss .* at epoch 1, step 1"):
        train_model(model, series, SMALL, progress=False)


def test_series_too_short_is_refused():
    series = [synthetic_series(n=100)]
    with pytest.raises(TrainingError, match="too short"):
        train_model(small_model(series), series, SMALL, progress=False)


def test_scaling_pools_series_of_different_magnitudes():
    a = SimpleNamespace(values=np.full(10, 10.0), covariates=np.zeros((10, 1)))
    b = SimpleNamespace(values=np.full(10, 1000.0), covariates=np.ones((10, 1)))
    stats = fit_scaling([a.values, b.values], [a.covariates, b.covariates])
    assert stats["value_scale"] > 0 and stats["covariate_loc"] == (0.5,)


def test_scaling_unit_comes_from_the_active_values_of_a_mostly_zero_series():
    # A call centre: closed (0) most of the time, 100-300 calls when open. The median is 0; the unit
    # must come from the open hours, or asinh becomes a log of counts and errors blow up raw.
    open_hours = np.tile([100.0, 200.0, 300.0], 10)
    values = np.concatenate([np.zeros(60), open_hours])
    stats = fit_scaling([values], [np.zeros((len(values), 0))])
    assert stats["value_unit"] == pytest.approx(20.0)
    assert fit_scaling([np.zeros(5)], [np.zeros((5, 0))])["value_unit"] == 1.0  # all zero: a unit of 1


def test_the_blend_leans_towards_the_reference_that_did_best_on_validation():
    # A daily cycle (48 steps) with little noise: a day back is a far better forecast than the
    # latest value, so the forecast moves half way towards lag 48's seasonal naive.
    series = [synthetic_series(n=48 * 12)]
    cfg = replace(SMALL, max_epochs=1)
    model, result = train_forecaster(small_model(series, lags=(48,)).config, series, cfg, progress=False)
    errors = result.blend_errors
    assert set(errors) == {"network", "latest_value", "lag_48"}
    assert errors["lag_48"] < errors["latest_value"] / 2
    assert result.blend == (0.0, 0.5) and model.config.blend == (0.0, 0.5)
    assert result.summary()["blend"] == [0.0, 0.5]
    config = small_model(series, lags=(48,)).config
    off, result = train_forecaster(config, series, replace(cfg, blend=0.0), progress=False)
    assert off.config.blend == () and result.blend == () and off.blend is None


def test_pinball_loss_equals_the_textbook_definition_over_masked_points():
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 5, 4, 3, generator=gen)
    target = torch.randn(3, 5, 4, generator=gen)
    mask = torch.rand(3, 5, generator=gen) > 0.3
    q = torch.tensor([0.1, 0.5, 0.9])
    expected = []
    for b, t in zip(*torch.nonzero(mask, as_tuple=True), strict=True):
        diff = target[b, t].unsqueeze(-1) - pred[b, t]  # (h, Q)
        expected.append(torch.maximum(q * diff, (q - 1) * diff).mean())
    assert float(pinball_loss(pred, target, mask, q)) == pytest.approx(float(torch.stack(expected).mean()), rel=1e-5)


def test_members_train_one_after_another_each_as_its_own_network():
    series = [synthetic_series(n=48 * 12)]
    cfg = TrainConfig(window=96, batch_size=32, max_epochs=2, stride=24, burn_in=12, min_epoch_steps=1, seed=5)
    config = scaled_config(ModelConfig(hidden_size=16, num_layers=1, horizon=6, members=2), series)
    seen = []
    model, result = train_forecaster(config, series, cfg, on_epoch=lambda e, m: seen.append((e, m)), progress=False)
    assert model.config.members == 2 and model.config.hidden_size == 16
    assert [r.seed for r in result.members] == member_seeds(5, 2) == [5, 1005]
    assert result.epochs == 4 and result.summary()["members"][1]["seed"] == 1005
    assert [e for e, _ in seen] == [1, 2, 3, 4, 5, 1, 2, 3, 4, 5]  # 2 epochs, 3 fine-tuning passes
    assert set(seen[0][1]) >= {"member0.train_loss", "member0.grad_norm_max"} and "member1.val_loss" in seen[5][1]
    assert "member0.finetune_loss" in seen[2][1]
    # Member 0 is exactly the single network of the same seed, and it lives in the first half of every gate.
    single, single_result = train_forecaster(
        scaled_config(ModelConfig(hidden_size=8, num_layers=1, horizon=6), series), series, cfg, progress=False
    )
    assert single_result.history == result.members[0].history
    packed_hh = model.rnn.weight_hh_l0.detach()
    for gate in range(4):
        assert torch.equal(packed_hh[gate * 16 : gate * 16 + 8, :8], single.rnn.weight_hh_l0[gate * 8 : (gate + 1) * 8])
        assert not packed_hh[gate * 16 : gate * 16 + 8, 8:].any()  # never reads member 1's units
    with pytest.raises(ValueError, match="train_forecaster"):
        train_model(model, series, cfg, progress=False)


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    cfg = load_config(path)
    assert cfg.data.source == "elecdemand" and cfg.model.hidden_size % cfg.model.members == 0
    assert all(day.startswith("2014-") for day in cfg.model.holidays)


def test_the_ensemble_config_is_the_default_with_five_members():
    """What README and docs/experiments.md say of configs/elecdemand-ensemble.yaml."""
    configs = Path(__file__).parents[2] / "configs"
    ensemble = load_config(configs / "elecdemand-ensemble.yaml")
    assert ensemble.model.members == 5 and ensemble.model.member_size == 64
    assert ensemble == load_config(configs / "elecdemand.yaml", ["model.hidden_size=320", "model.members=5"])


def test_windows_start_from_the_state_the_series_has_there_after_all_its_history():
    """A server steps a series from its first observation on: a training window's warm state must be
    exactly the state of one run of the model over everything before the window."""
    from training.train import _batch, _warm_states

    series = [synthetic_series(n=48 * 12, seed=s, series_id=f"s{s}") for s in (1, 2)]
    model = small_model(series, lags=(48,))
    train_w, val_w, recent_w = _pack(model, series, SMALL)
    starts = np.concatenate([train_w.starts, val_w.starts, recent_w.starts])
    warm = _warm_states(model, train_w, starts)
    n = len(series[0].values)
    for row, window_start in ((3, train_w.starts[3]), (-2, train_w.starts[-2])):  # one in each series
        first = 0 if window_start < n else n
        s = series[0] if first == 0 else series[1]
        upto = window_start - first
        with torch.no_grad():
            _, h, c, *_ = model(
                torch.tensor(s.values[None, :upto]), torch.tensor(s.timestamps_ms[None, :upto]), None,
                *model.zero_state(1).values(),
            )  # fmt: skip
        *_, state = _batch(model, train_w, np.array([row % len(train_w.starts)]), SMALL.window, warm)
        np.testing.assert_allclose(state["h"], h, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state["c"], c, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(state["h"], torch.zeros_like(state["h"]))  # not the zero state
