"""The network: calendar encodings, scaling, non-crossing quantiles, state handling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.model import Forecaster, ModelConfig, pack_members

MONDAY_2014_01_06 = 1_388_966_400_000  # 2014-01-06 00:00 UTC


def model(**kw) -> Forecaster:
    torch.manual_seed(0)
    base = dict(hidden_size=8, num_layers=2, horizon=5, value_unit=0.5, value_loc=2.5, value_scale=0.4)
    return Forecaster(ModelConfig(**{**base, **kw})).eval()


def test_calendar_features_from_epoch_ms():
    m = model(daily_harmonics=1)
    ts = torch.tensor([[MONDAY_2014_01_06 + 6 * 3_600_000, MONDAY_2014_01_06 + 5 * 86_400_000 + 18 * 3_600_000]])
    f = m.features(torch.tensor([[10.0, 10.0]]), ts, None)[0]  # (T, F): z, sin, cos, 7 weekday one-hots
    assert f.shape == (2, 1 + 2 + 7 + 2)  # + holiday today, holiday tomorrow
    assert f[0, 1].item() == pytest.approx(1.0, abs=1e-6)  # 06:00 -> a quarter of the day
    assert f[1, 1].item() == pytest.approx(-1.0, abs=1e-6)  # 18:00
    assert f[0, 3:].argmax().item() == 0 and f[1, 3:].argmax().item() == 5  # Monday, Saturday


def test_scaling_round_trips_across_magnitudes_and_signs():
    m = model()
    x = torch.tensor([-50.0, 0.0, 0.3, 7.0, 1234.5])
    assert torch.allclose(m.unscale_values(m.scale_values(x)), x, rtol=1e-5, atol=1e-5)
    # A series 10x larger is a level shift of log(10)/value_scale, not a different unit.
    z = m.scale_values(torch.tensor([400.0, 4000.0]))
    assert (z[1] - z[0]).item() == pytest.approx(math.log(10) / 0.4, rel=1e-3)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_quantiles_never_cross_even_for_extreme_inputs(cell):
    m = model(cell=cell, quantiles=(0.05, 0.25, 0.5, 0.75, 0.95))
    with torch.no_grad():
        for p in m.head.parameters():
            p.normal_(0, 5.0)  # wild head weights: crossing would show
    values = torch.tensor(np.random.default_rng(0).normal(10, 5, (4, 30)), dtype=torch.float32)
    ts = MONDAY_2014_01_06 + torch.arange(30)[None].repeat(4, 1) * 1_800_000
    for lags in ((), (3, 7)):
        m = model(cell=cell, quantiles=(0.05, 0.25, 0.5, 0.75, 0.95), lags=lags)
        with torch.no_grad():
            for p in m.head.parameters():
                p.normal_(0, 5.0)  # wild head weights: crossing would show
        forecast, *_ = m(values, ts, None, *m.zero_state(4).values())
        assert forecast.shape == (4, 5, 5)
        assert (forecast.diff(dim=-1) >= 0).all()


@pytest.mark.parametrize("lags", [(), (4, 9)])
def test_state_carries_history(lags):
    m = model(lags=lags)
    ts = MONDAY_2014_01_06 + torch.arange(20)[None] * 1_800_000
    values = torch.linspace(5, 15, 20)[None]
    zero = list(m.zero_state(1).values())
    whole, *state_all = m(values, ts, None, *zero)
    _, *state1 = m(values[:, :12], ts[:, :12], None, *zero)
    rest, *state2 = m(values[:, 12:], ts[:, 12:], None, *state1)
    assert torch.allclose(whole, rest, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(state_all, state2))
    fresh, *_ = m(values[:, 12:], ts[:, 12:], None, *zero)
    assert not torch.allclose(fresh, rest, atol=1e-4)  # zero state = start of series


def test_the_lag_buffer_keeps_the_last_values_and_counts_them():
    m = model(lags=(3, 5))
    assert m.config.state_names == ("h", "c", "lags", "lags_seen") and m.config.buffer_size == 5
    ts = MONDAY_2014_01_06 + torch.arange(7)[None] * 1_800_000
    values = torch.arange(1.0, 8.0)[None]  # 1..7
    state = m.zero_state(1)
    _, _, _, lags, seen = m(values[:, :3], ts[:, :3], None, *state.values())
    assert lags.tolist() == [[0.0, 0.0, 1.0, 2.0, 3.0]] and seen.tolist() == [[3.0]]  # not full yet
    _, _, _, lags, seen = m(values[:, 3:], ts[:, 3:], None, state["h"], state["c"], lags, seen)
    assert lags.tolist() == [[3.0, 4.0, 5.0, 6.0, 7.0]] and seen.tolist() == [[5.0]]  # the last 5, capped at S


def forced_to(m: Forecaster, reference: int) -> Forecaster:
    """The head forecasts one reference exactly: zero weights, one logit far above the others."""
    with torch.no_grad():
        m.head.weight.zero_()
        bias = m.head.bias.view(m.config.horizon, m.config.head_size)
        bias.zero_()
        bias[:, m.config.num_quantiles + reference] = 50.0
    return m


@pytest.mark.parametrize("lag_index, lag", [(1, 4), (2, 6)])
def test_the_head_forecasts_around_seasonal_references(lag_index, lag):
    """With the head forced onto one lag's reference, the forecast is that lag's seasonal naive
    forecast (the value one or more whole lags before each target step), and the latest value
    while the buffer does not yet hold it."""
    m = forced_to(model(lags=(4, 6), horizon=9, quantiles=(0.5,)), lag_index)
    n = 20
    values = torch.tensor(np.random.default_rng(1).uniform(5, 15, n), dtype=torch.float32)[None]
    ts = MONDAY_2014_01_06 + torch.arange(n)[None] * 1_800_000
    with torch.no_grad():
        path = m.unscale_values(m.forecast_all_z(values, ts))[0, :, :, 0]  # (T, horizon)
    y = values[0]
    for t in range(n):
        for k in range(1, 10):
            back = lag * -(-k // lag)  # whole lags before step t + k
            expected = y[t + k - back] if t + k - back >= 0 else y[t]  # unknown yet: the latest value
            assert path[t, k - 1].item() == pytest.approx(expected.item(), rel=1e-4), (t, k)


def test_the_blend_moves_the_whole_band_towards_a_reference():
    """Weight 1 on the latest value makes the point forecast the latest value at every step; any
    weight moves every quantile by the same amount, so the band keeps its width."""
    n = 30
    values = torch.tensor(np.random.default_rng(2).uniform(5, 15, n), dtype=torch.float32)[None]
    ts = MONDAY_2014_01_06 + torch.arange(n)[None] * 1_800_000
    plain = model(lags=(4,), horizon=6)
    with torch.no_grad():
        before = plain.forecast_all_z(values, ts)
        for blend in [(1.0, 0.0), (0.3, 0.5)]:
            m = model(lags=(4,), horizon=6, blend=blend)
            m.load_state_dict(plain.state_dict())
            after, refs = m.forecast_all_z(values, ts, with_references=True)
            shift = after - before  # (1, T, horizon, Q): the same for every quantile
            assert torch.allclose(shift, shift[..., :1].expand_as(shift), atol=1e-5)
            expected = sum(w * (refs[..., r] - before[..., 1]) for r, w in enumerate(blend))
            assert torch.allclose(shift[..., 0], expected, atol=1e-5)
            assert torch.equal(m.forecast_all_z(values, ts, blended=False), before)
        point = m.unscale_values(model(lags=(4,), horizon=6, blend=(1.0, 0.0)).forecast_all_z(values, ts))
    # a fresh network of the same seed: weight 1 on the latest value ignores whatever it forecasts
    assert torch.allclose(point[0, :, :, 1], values[0, :, None].expand(n, 6), rtol=1e-4)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(cell="rnn"), "model.cell"),
        (dict(quantiles=(0.9, 0.1)), "strictly increasing"),
        (dict(quantiles=(0.0, 0.5)), "strictly increasing"),
        (dict(horizon=0), "model.horizon"),
        (dict(hidden_size=10, members=3), "split evenly"),
        (dict(lags=(1, 48)), "model.lags"),
        (dict(lags=(336, 48)), "model.lags"),
        (dict(lags=(48,), blend=(0.5,)), "one weight >= 0 per reference"),
        (dict(lags=(48,), blend=(0.7, 0.6)), "summing to at most 1"),
        (dict(blend=(-0.1,)), "one weight >= 0"),
        (
            dict(covariates=("a",), covariate_loc=(0.0, 1.0), covariate_scale=(1.0, 1.0)),
            "one entry per covariate",
        ),
    ],
)
def test_config_errors_say_what_is_wrong(kw, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kw)


def test_holiday_flags_for_today_and_tomorrow():
    m = model(daily_harmonics=1, holidays=("2014-01-07",))
    day = 86_400_000
    ts = torch.tensor([[MONDAY_2014_01_06 + 23 * 3_600_000, MONDAY_2014_01_06 + day + 1, MONDAY_2014_01_06 + 2 * day]])
    f = m.features(torch.full((1, 3), 10.0), ts, None)[0]
    today, tomorrow = f[:, 10], f[:, 11]  # after z, sin, cos and the 7 weekdays
    assert today.tolist() == [0.0, 1.0, 0.0] and tomorrow.tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="ISO dates"):
        ModelConfig(holidays=("25/12/2014",))


@pytest.mark.parametrize("cell, lags", [("lstm", ()), ("gru", ()), ("lstm", (3, 7))])
def test_packed_members_forecast_exactly_the_mean_of_the_networks(cell, lags):
    nets = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        nets.append(Forecaster(ModelConfig(cell=cell, hidden_size=4, num_layers=2, horizon=5, lags=lags)).eval())
    packed = pack_members(nets)
    assert packed.config.hidden_size == 12 and packed.config.members == 3 and packed.config.member_size == 4
    values = torch.rand(2, 30) * 3 + 1
    ts = (MONDAY_2014_01_06 + torch.arange(30) * 1_800_000).repeat(2, 1)
    with torch.no_grad():
        each = torch.stack([n.forecast_all_z(values, ts) for n in nets])
        np.testing.assert_allclose(packed.forecast_all_z(values, ts), each.mean(dim=0), rtol=1e-5, atol=1e-6)
        # Stepping the packed state (the serving path) agrees too, and its state is the members' states side by side.
        _, h1, *state1 = packed(values[:, :10], ts[:, :10], None, *packed.zero_state(2).values())
        out, *_ = packed(values[:, 10:], ts[:, 10:], None, h1, *state1)
        np.testing.assert_allclose(out, packed.unscale_values(packed.forecast_all_z(values, ts)[:, -1]), rtol=1e-5)
        _, member_h, *_ = nets[1](values[:, :10], ts[:, :10], None, *nets[1].zero_state(2).values())
        np.testing.assert_allclose(h1[:, :, 4:8], member_h, rtol=1e-5, atol=1e-6)
    assert (torch.diff(packed.forecast_all_z(values, ts), dim=-1) >= 0).all()  # still never crosses


def test_only_networks_of_one_config_pack():
    a = Forecaster(ModelConfig(hidden_size=4))
    with pytest.raises(ValueError, match="one and the same config"):
        pack_members([a, Forecaster(ModelConfig(hidden_size=6))])
    with pytest.raises(ValueError, match="one and the same config"):
        pack_members([pack_members([a, a]), a])
