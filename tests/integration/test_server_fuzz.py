"""Property-based fuzz of a live server (hypothesis): StreamForecast request sequences and Forecast
requests with any series ids (empty, unicode, over the 256-byte limit, repeated in one request),
timestamps (any int64: backwards, equal, the extremes), values (NaN, inf, huge, -0.0,
subnormals), covariate counts, resets, ends, empty messages, unknown model names; and bytes that
are not protobuf at all.

Every answer is what a model of the rules (below) predicts: OK with one forecast per observation,
in order, with the right series id, timestamp and steps_seen, finite, and equal to ONNX Runtime
run offline when the series' values are moderate; or the client error the rules predict
(INVALID_ARGUMENT, NOT_FOUND), with a message. Never UNKNOWN or INTERNAL. After every example the
server is SERVING and a well-formed neighbour stream still gets exactly the offline forecasts.

The one outcome the rules cannot predict exactly: finite but huge values (1e20, say) can overflow
float32 inside the graph; the server then refuses the step with INVALID_ARGUMENT ("the model's
forecast is not finite") instead of answering NaN or inf. That answer is accepted only after such
values were sent.

Profiles: HYPOTHESIS_PROFILE=ci (the default, so `make test` and CI run it: 2,000 examples per
property, derandomized) or quick (100, for local runs).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from serving.proto import pb, pb_grpc
from serving.validation import MIN_TIMESTAMP_MS, max_timestamp_ms
from tests.serving_support import (
    FREQ_MS,
    ROOT,
    SERVING,
    START_MS,
    OfflineModel,
    RunningServer,
    Stream,
    health_status,
    server_config,
    wait_for,
)

settings.register_profile(
    "ci",
    max_examples=2000,
    deadline=None,  # a live server on shared cores: time per example varies
    derandomize=True,  # the same examples on every run: a failure in CI reproduces locally
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("quick", settings.get_profile("ci"), max_examples=100)
FUZZ = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

I64 = np.iinfo(np.int64)
HORIZON = 6  # the tiny models' (tests/conftest.py train_tiny)
MAX_TS = max_timestamp_ms(HORIZON, FREQ_MS)  # the latest timestamp the server takes
EDGES = [I64.min, MIN_TIMESTAMP_MS, -1, 0, MAX_TS, MAX_TS + 1, I64.max]
MAX_ID_BYTES = 256  # the server's default --max-series-id-bytes
MODERATE = 1e4  # forecasts of series whose values stay within this are compared with ORT offline
HUGE = 1e6  # values beyond this may overflow the graph (an INVALID_ARGUMENT the rules cannot predict)
CLIENT_ERRORS = {"INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "OUT_OF_RANGE"}
NOT_FINITE = "the model's forecast is not finite"


# -- the servers: the plain LSTM of every server test, and one with two covariates -----------------


class Neighbour:
    """A well-formed series on its own stream next to the fuzzed ones, checked at every step."""

    def __init__(self, stub, model_dir, covariates: int) -> None:
        self.stream, self.offline, self.covariates, self.t = Stream(stub), OfflineModel(model_dir), covariates, 0

    def step(self) -> None:
        ts, value = START_MS + self.t * FREQ_MS, 10.0 + self.t % 7
        cov = [20.0 + self.t % 3, 1.0][: self.covariates]
        (f,) = self.stream.send({"series_id": "neighbour", "timestamp_ms": ts, "value": value, "covariates": cov})
        self.t += 1
        assert (f.series_id, f.timestamp_ms, f.steps_seen) == ("neighbour", ts, self.t)
        expected = self.offline.step_one("neighbour", ts, value, cov)
        np.testing.assert_allclose([q.values for q in f.quantiles], expected.T, atol=1e-3)


class Target:
    """One live server (its own event loop and port), a channel to it, its graphs run offline,
    and a neighbour stream."""

    def __init__(self, server: RunningServer, channel: grpc.Channel, model_dir, covariates: int) -> None:
        self.server, self.channel, self.covariates = server, channel, covariates
        self.stub = pb_grpc.ForecasterStub(channel)
        info = self.stub.GetModelInfo(pb.GetModelInfoRequest())
        assert (info.horizon, info.freq_ms, len(info.covariates)) == (HORIZON, FREQ_MS, covariates)
        self.offline = OfflineModel(model_dir)
        self.neighbour = Neighbour(self.stub, model_dir, covariates)


def _target(model_dir, covariates: int):
    with (
        RunningServer(server_config(str(model_dir))) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        target = Target(server, channel, model_dir, covariates)
        yield target
        target.neighbour.stream.close()


@pytest.fixture(scope="module")
def plain(model_dir):
    yield from _target(model_dir, 0)


@pytest.fixture(scope="module")
def with_covariates(tiny_model_dir):
    yield from _target(tiny_model_dir("lstm", covariates=("temperature", "workday")), 2)


@pytest.fixture(scope="module")
def targets(plain, with_covariates):
    return {"plain": plain, "covariates": with_covariates}


# -- what to send ---------------------------------------------------------------------------------

# Drawing is most of an example's cost: hypothesis takes milliseconds for a list of arbitrary
# floats or a nested one_of here. So each field is drawn as a small integer code saying which
# kind of value it gets, and only then, where needed, the value itself: 5-8 choices per
# observation. Shrinking drives every code to 0, the plainest case.
POOL = ["a", "b", "c", "ünï", "🦜"]  # a few ids, so series repeat, reset, end and start again
ODD_IDS = ["\x00", " ", "a\nb", "\u200b", "🦜" * 64, "é" * 128, "x" * 256]  # valid; the last 3: 256 bytes
BAD_IDS = ["", "🦜" * 64 + "é", "x" * 257, "é" * 129]  # empty, or over 256 bytes
FINITE_VALUES = [3.4028235e38, -3.4028235e38, 1e20, -1e20, 1e6, 1.1754944e-38, 1e-45, -0.0, 0.0]
NOT_FINITE_VALUES = [float("nan"), float("inf"), -float("inf")]
MODELS = [""] * 14 + ["forecaster", "nope"]  # the model field: unset, the served model's name, another


def pick(draw, items: list):
    return items[draw(st.integers(0, len(items) - 1))]


def draw_id(draw) -> str:
    kind = draw(st.integers(0, 15))
    if kind < 11:
        return POOL[kind % len(POOL)]
    if kind < 14:
        return pick(draw, ODD_IDS)
    return pick(draw, BAD_IDS) if kind == 14 else draw(st.text(max_size=6))


def draw_value(draw) -> float:
    """Moderate (k/8 in [-100, 100]) mostly; else huge, tiny or signed zero; NaN or ±inf; any float32."""
    kind = draw(st.integers(0, 15))
    if kind < 13:
        return draw(st.integers(-800, 800)) / 8
    if kind == 13:
        return pick(draw, FINITE_VALUES)
    return pick(draw, NOT_FINITE_VALUES) if kind == 14 else draw(st.floats(width=32))


def draw_timestamp(draw) -> tuple[str, int]:
    """Relative to the series' previous one (resolved by the rules) mostly, else absolute."""
    kind = draw(st.integers(0, 15))
    if kind < 12:
        return "next", 1 + kind % 3
    if kind == 12:
        return "back", draw(st.integers(0, 2))  # 0: the same timestamp again
    return ("at", pick(draw, EDGES)) if kind == 13 else ("at", draw(st.integers(I64.min, I64.max)))


def draw_covariates(draw, count: int) -> list[float]:
    """The model's count of moderate values mostly; else the count of anything, or 0-3 values."""
    kind = draw(st.integers(0, 15))
    if kind < 14:
        return [draw(st.integers(-80, 80)) / 8 for _ in range(count)]
    return [draw_value(draw) for _ in range(count if kind == 14 else draw(st.integers(0, 3)))]


@st.composite
def observation(draw, covariates: int) -> dict:
    flags = draw(st.integers(0, 63))  # reset one time in eight, end one time in eight
    return {
        "series_id": draw_id(draw), "ts": draw_timestamp(draw), "value": draw_value(draw),
        "covariates": draw_covariates(draw, covariates), "reset": flags % 8 == 7, "end": flags // 8 == 7,
    }  # fmt: skip


@st.composite
def stream_case(draw) -> tuple[str, list[tuple[str, list[dict]]]]:
    """Which server, and 1-4 requests (model name, 0-4 observations) for one stream."""
    which = draw(st.sampled_from(["plain", "covariates"]))
    c = 0 if which == "plain" else 2
    request = st.tuples(st.sampled_from(MODELS), st.lists(observation(c), max_size=4))
    return which, draw(st.lists(request, min_size=1, max_size=4))


# -- the rules: what the server must answer ----------------------------------------------------------


def is_huge(values, covariates) -> bool:
    """Values beyond HUGE (NaN excepted) may overflow the graph."""
    return bool((np.abs(np.array([*values, *covariates], np.float32)) > HUGE).any())


def is_moderate(values, covariates) -> bool:
    return bool((np.abs(np.array([*values, *covariates], np.float32)) <= MODERATE).all())


class Rules:
    """The stream's series as the server must see them: previous timestamp, steps, and whether
    their values so far are moderate (comparable with ORT offline) or huge (may overflow)."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.live: dict[str, dict] = {}
        self.incarnations = 0
        self.huge = False  # a huge value was sent in this stream: an overflow refusal is possible
        self.clock: dict[str, int] = {}  # the client's side: the last timestamp sent for each id

    def resolve(self, o: dict) -> int:
        """The timestamp to send: "next"/"back" count steps from the last one sent for this id."""
        kind, n = o["ts"]
        base = self.clock.get(o["series_id"], START_MS)
        ts = n if kind == "at" else int(np.clip(base + (n if kind == "next" else -n) * FREQ_MS, I64.min, I64.max))
        self.clock[o["series_id"]] = ts
        return ts

    def apply(self, model: str, observations: list[dict]) -> tuple[str | None, list[dict]]:
        """(None, what each forecast must be) if the request must be answered, else (code, [])."""
        if model not in ("", "forecaster"):
            return "NOT_FOUND", []
        # Waves may step a huge value before the request's bad observation is reached.
        self.huge |= any(is_huge([o["value"]], o["covariates"]) for o in observations)
        if any(o["series_id"] == "" for o in observations):
            return "INVALID_ARGUMENT", []
        expected = []
        for o in observations:
            sid, ts = o["series_id"], o["sent_ts"]
            value, cov = np.float32(o["value"]), np.asarray(o["covariates"], np.float32)
            fresh = sid not in self.live or o["reset"]
            series = {"ts": I64.min, "steps": 0, "moderate": True} if fresh else self.live[sid]
            if fresh:
                self.incarnations += 1
                series["key"] = f"{sid}#{self.incarnations}"
            bad = (
                (fresh and len(sid.encode()) > MAX_ID_BYTES)
                or len(cov) != self.target.covariates
                or not np.isfinite(value)
                or not np.isfinite(cov).all()
                or not MIN_TIMESTAMP_MS <= ts <= MAX_TS
                or ts <= series["ts"]
            )
            if bad:
                return "INVALID_ARGUMENT", []
            series["moderate"] &= is_moderate([value], cov)
            series.update(ts=ts, steps=series["steps"] + 1)
            self.live[sid] = series
            expected.append({"series_id": sid, "ts": ts, "value": value, "cov": cov, **series})
            if o["end"]:
                del self.live[sid]
        return None, expected


def to_pb(o: dict) -> pb.Observation:
    return pb.Observation(
        series_id=o["series_id"], timestamp_ms=o["sent_ts"], value=o["value"], covariates=o["covariates"],
        reset=o["reset"], end=o["end"],
    )  # fmt: skip


def check_forecasts(target: Target, forecasts, expected: list[dict]) -> None:
    offline = target.offline
    assert len(forecasts) == len(expected)
    for f, e in zip(forecasts, expected):
        assert (f.series_id, f.timestamp_ms, f.steps_seen) == (e["series_id"], e["ts"], e["steps"])
        quantiles = np.array([q.values for q in f.quantiles], np.float32)  # [Q, horizon]
        assert np.isfinite(quantiles).all() and np.isfinite(f.point).all()
        assert list(f.forecast_timestamps_ms) == [e["ts"] + k * FREQ_MS for k in range(1, HORIZON + 1)]
        # Offline state per series incarnation (a reset or end starts a new one), stepped always.
        want = offline.step_one(e["key"], e["ts"], float(e["value"]), e["cov"])
        if e["moderate"]:
            np.testing.assert_allclose(quantiles, want.T, rtol=1e-4, atol=1e-3)


def code_of(err: grpc.RpcError) -> str:
    name = err.code().name
    assert name in CLIENT_ERRORS, f"{name}: {err.details()}"
    assert err.details(), f"{name} without a message"
    return name


def after_each(target: Target) -> None:
    assert health_status(target.channel) == SERVING
    target.neighbour.step()


# -- the properties ----------------------------------------------------------------------------------


@FUZZ
@given(case=stream_case())
def test_stream_requests_are_answered_or_refused_as_the_rules_say(targets, case):
    which, requests = case
    target = targets[which]
    target.offline.states.clear()  # the offline twin of this example's stream starts empty too
    rules = Rules(target)
    messages, outcomes = [], []
    for model, observations in requests:
        for o in observations:
            o["sent_ts"] = rules.resolve(o)
        outcomes.append(rules.apply(model, observations))
        messages.append(pb.StreamRequest(model=model, observations=[to_pb(o) for o in observations]))
        if outcomes[-1][0] is not None:
            break  # the stream ends at its first refused request: nothing after it is read
    answers, error = [], None
    try:
        for answer in target.stub.StreamForecast(iter(messages), timeout=60):
            answers.append(answer)
    except grpc.RpcError as err:
        error = err
    for i, (code, expected) in enumerate(outcomes):
        if i < len(answers):
            assert code is None, f"request {i} should have been refused with {code}"
            check_forecasts(target, answers[i].forecasts, expected)
            event(f"a request answered with {len(expected)} forecasts")
            continue
        assert error is not None, f"request {i} was not answered"
        got = code_of(error)
        event(f"refused: {got}{' (overflow)' if NOT_FINITE in error.details() else ''}")
        if code is None:  # refused although every input was fine: only an overflow may do that
            assert rules.huge and got == "INVALID_ARGUMENT" and NOT_FINITE in error.details(), error.details()
        else:
            assert (got == code) or (rules.huge and NOT_FINITE in error.details()), (code, got, error.details())
        break
    else:
        assert error is None, f"{error.code().name}: {error.details()}"
    after_each(target)


@st.composite
def history(draw, covariates: int) -> dict:
    t = draw(st.integers(0, 15)) % 5  # 1-4 steps, or none
    kind = draw(st.integers(0, 15))
    if kind < 14:
        ts = [START_MS + k * FREQ_MS for k in range(t)]
    elif kind == 14:
        ts = [pick(draw, EDGES) for _ in range(draw(st.integers(0, 3)))]
    else:
        ts = [draw(st.integers(I64.min, I64.max)) for _ in range(t + draw(st.integers(0, 1)))]
    steps = [draw_covariates(draw, covariates) for _ in range(t)]
    return {"series_id": draw_id(draw), "ts": ts, "values": [draw_value(draw) for _ in range(t)],
            "covariates": [v for row in steps for v in row]}  # fmt: skip


@st.composite
def forecast_case(draw) -> tuple[str, str, list[dict]]:
    """Which server, a model name, and 0-3 histories."""
    which = draw(st.sampled_from(["plain", "covariates"]))
    c = 0 if which == "plain" else 2
    return which, draw(st.sampled_from(MODELS)), draw(st.lists(history(c), max_size=3))


def history_is_valid(h: dict, target: Target) -> bool:
    ts, vals = np.array(h["ts"], np.int64), np.array(h["values"], np.float32)
    cov = np.array(h["covariates"], np.float32)
    return (
        h["series_id"] != ""
        and len(h["series_id"].encode()) <= MAX_ID_BYTES
        and len(vals) > 0
        and len(ts) == len(vals)
        and len(cov) == len(vals) * target.covariates
        and bool(np.isfinite(vals).all() and np.isfinite(cov).all())
        and bool(((ts >= MIN_TIMESTAMP_MS) & (ts <= MAX_TS)).all())
        and bool((ts[1:] > ts[:-1]).all())
    )


@FUZZ
@given(case=forecast_case())
def test_forecast_requests_are_answered_or_refused_as_the_rules_say(targets, case):
    which, model, histories = case
    target = targets[which]
    request = pb.ForecastRequest(
        model=model,
        series=[
            pb.SeriesHistory(series_id=h["series_id"], timestamps_ms=h["ts"], values=h["values"],
                             covariates=h["covariates"])
            for h in histories
        ],
    )  # fmt: skip
    if model not in ("", "forecaster"):
        expected = "NOT_FOUND"
    else:
        expected = None if all(history_is_valid(h, target) for h in histories) else "INVALID_ARGUMENT"
    huge = any(is_huge(h["values"], h["covariates"]) for h in histories)
    try:
        answer = target.stub.Forecast(request, timeout=60)
    except grpc.RpcError as err:
        got = code_of(err)
        overflow = huge and got == "INVALID_ARGUMENT" and NOT_FINITE in err.details()
        event(f"refused: {got}{' (overflow)' if overflow else ''}")
        assert got == expected or overflow, (expected, got, err.details())
    else:
        assert expected is None, f"should have been refused with {expected}"
        event(f"answered: {len(answer.forecasts)} forecasts")
        assert [f.series_id for f in answer.forecasts] == [h["series_id"] for h in histories]
        for f, h in zip(answer.forecasts, histories):
            assert (f.timestamp_ms, f.steps_seen) == (h["ts"][-1], len(h["values"]))
            assert list(f.forecast_timestamps_ms) == [h["ts"][-1] + k * FREQ_MS for k in range(1, HORIZON + 1)]
            quantiles = np.array([q.values for q in f.quantiles], np.float32)
            assert np.isfinite(quantiles).all()
            if is_moderate(h["values"], h["covariates"]):
                want = target.offline.run_sequence(h["ts"], h["values"], h["covariates"])
                np.testing.assert_allclose(quantiles, want.T, rtol=1e-4, atol=1e-3)
    after_each(target)


def _identity(data: bytes) -> bytes:
    return data


@settings(FUZZ, max_examples=max(25, FUZZ.max_examples // 4))  # a simpler space than the request sequences
@given(method=st.sampled_from(["StreamForecast", "Forecast", "GetModelInfo"]), data=st.binary(max_size=48))
def test_bytes_that_are_not_a_request_are_a_client_error(plain, method, data):
    path = f"/forecast.v1.Forecaster/{method}"
    try:
        if method == "StreamForecast":
            call = plain.channel.stream_stream(path, request_serializer=_identity, response_deserializer=_identity)
            list(call(iter([data]), timeout=30))
        else:
            call = plain.channel.unary_unary(path, request_serializer=_identity, response_deserializer=_identity)
            call(data, timeout=30)
    except grpc.RpcError as err:
        code_of(err)
        if "cannot parse the request" in err.details():
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    after_each(plain)


# -- a client that vanishes mid-stream ------------------------------------------------------------------


def test_a_cancelled_stream_frees_its_series(plain):
    server = plain.server
    before = server.metric("forecast_live_series")
    stream = Stream(plain.stub)
    stream.send(*({"series_id": f"gone{i}", "timestamp_ms": START_MS, "value": 1.0} for i in range(5)))
    assert server.metric("forecast_live_series") == before + 5
    stream.responses.cancel()  # RST_STREAM: no half-close, no more reads
    stream.requests.put(None)  # lets the client's request thread go
    wait_for(lambda: server.metric("forecast_live_series") == before, timeout=10)
    after_each(plain)


CLIENT = """
import queue, sys, grpc
sys.path.insert(0, {root!r})
from serving.proto import pb, pb_grpc
requests = queue.Queue()
responses = pb_grpc.ForecasterStub(grpc.insecure_channel({target!r})).StreamForecast(iter(requests.get, None))
observations = [pb.Observation(series_id=f"killed{{i}}", timestamp_ms={start}, value=1.0) for i in range(7)]
requests.put(pb.StreamRequest(observations=observations))
next(responses)
print("sent", flush=True)
sys.stdin.read()  # until killed
"""


def test_a_client_process_killed_mid_stream_frees_its_series(plain):
    server = plain.server
    before = server.metric("forecast_live_series")
    code = CLIENT.format(root=str(ROOT), target=server.target, start=START_MS)
    client = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert client.stdout.readline().strip() == "sent"
        assert server.metric("forecast_live_series") == before + 7
        client.send_signal(signal.SIGKILL)  # its kernel closes the connection: no half-close, no goodbye
        client.wait(10)
    finally:
        client.kill()
    wait_for(lambda: server.metric("forecast_live_series") == before, timeout=10)
    after_each(plain)
