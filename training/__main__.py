"""``python -m training fit | promote | ensure-production`` (CONTRACT §3, §4)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

DEFAULT_CONFIG = "configs/elecdemand.yaml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="train, backtest, export, log, register and gate a model")
    fit.add_argument("--config", required=True, help="YAML config, e.g. configs/elecdemand.yaml")
    fit.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    fit.add_argument("--summary", type=Path, help="write a JSON summary of the fit here")
    fit.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    fit.add_argument("--force", action="store_true", help="promote the new version even if the gate says no")
    prom = sub.add_parser("promote", help="move the 'production' alias through the promotion gate")
    prom.add_argument("--name", default="forecaster", help="registered model name")
    prom.add_argument("--version", help="version to promote (default: the 'candidate' alias)")
    prom.add_argument("--force", action="store_true", help="promote without comparing backtest MASE")
    prom.add_argument(
        "--margin",
        type=float,
        default=None,
        help="share by which the best baseline must be beaten (default: the fit's); with --live, by which "
        "production's live MASE must be beaten (default 0.02)",
    )
    prom.add_argument(
        "--live",
        metavar="HOST:PORT",
        help="decide on live evidence: the candidate running in shadow on the server there (--shadow-alias)",
    )
    prom.add_argument(
        "--min-observations",
        type=int,
        default=1000,
        help="with --live: live (forecast, actual) pairs both versions must have scored (default 1000)",
    )
    prom.add_argument("--token-file", type=Path, help="with --live: the server's bearer token (the file's first)")
    prom.add_argument(
        "--tls", action="store_true", help="with --live: TLS, the server checked against the system's CAs"
    )
    prom.add_argument("--tls-ca", type=Path, help="with --live: TLS, the server checked against this CA (PEM)")
    prom.add_argument("--tls-cert", type=Path, help="with --live: this client's certificate (PEM), for mutual TLS")
    prom.add_argument("--tls-key", type=Path, help="with --live: this client's private key (PEM), for mutual TLS")
    prom.add_argument("--tls-server-name", help="with --live: the name the server's certificate must carry")
    ens = sub.add_parser("ensure-production", help="fit and promote the config's model unless one is in production")
    ens.add_argument("--config", default=DEFAULT_CONFIG)
    ens.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("alembic", "mlflow.store.db.utils", "mlflow.tracking._tracking_service", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")

    import mlflow

    from training.config import ConfigError, load_config
    from training.data import DataError
    from training.distributed import finish, workers_from_env
    from training.export import ExportError
    from training.pipeline import DEFAULT_TRACKING_URI, fit, train_only
    from training.registry import CANDIDATE, PRODUCTION, RegistryError, alias_version, promote
    from training.train import TrainingError

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI))
    try:
        if args.command == "promote" and args.live:
            from training.live_promote import promote_live

            decision, evidence = promote_live(
                args.name,
                args.live,
                min_observations=args.min_observations,
                margin=0.02 if args.margin is None else args.margin,
                token_file=args.token_file,
                tls=args.tls,
                tls_ca=args.tls_ca,
                tls_cert=args.tls_cert,
                tls_key=args.tls_key,
                tls_server_name=args.tls_server_name,
            )
            print(f"live accuracy on {args.live}: production version {evidence.served_version} (served) against "
                  f"candidate version {evidence.shadow_version} (shadow), the same pairs")  # fmt: skip
            print(evidence.table)
            print(decision.reason)
            return 0 if decision.promoted else 3
        if args.command == "promote":
            decision = promote(args.name, args.version, force=args.force, margin=args.margin)
            print(decision.reason)
            return 0 if decision.promoted else 3
        cfg = load_config(args.config, args.overrides)
        if args.command == "ensure-production":
            name = cfg.mlflow.registered_model
            current = alias_version(mlflow.MlflowClient(), name, PRODUCTION)
            if current is not None:
                print(f"{name}@{PRODUCTION} is version {current.version}; nothing to train")
                return 0
            print(f"no {name}@{PRODUCTION} in {mlflow.get_tracking_uri()}: training {args.config} first", flush=True)
        # Under torchrun: one process per rank, data-parallel (training.distributed); rank 0 does the rest.
        workers = workers_from_env(cfg.train.device)
        if workers.distributed and not workers.main:
            train_only(cfg, workers)
            finish(workers)
            return 0
        outcome = fit(
            cfg,
            Path(args.config),
            progress=not getattr(args, "no_progress", False),
            force=getattr(args, "force", False),
            workers=workers,
        )
        finish(workers)
    except (ConfigError, DataError, TrainingError, ExportError, RegistryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = outcome.summary()
    if getattr(args, "summary", None):
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(json.dumps(summary, indent=2))
    _print_table(summary)
    print(f"forecasting pyfunc (a DataFrame of histories in, forecasts out): {outcome.forecasting_model_uri}")
    print(
        f"registered {outcome.registered_model} version {outcome.version} (alias {CANDIDATE}); {outcome.promotion.reason}"
    )
    if not outcome.promotion.promoted:
        # Like `promote`: the gate said no. `make run` stops here rather than serve a loser.
        return 3
    return 0


def _print_table(summary: dict) -> None:
    rows = {"model": summary["metrics"], **summary["baselines"]}
    print(
        f"training stopped by {summary['training'].get('stop_reason', 'members')} after {summary['training']['epochs']} epochs"
    )
    keys = ("mase", "mae", "rmse", "mape", "smape")
    print(f"{'':24}" + "".join(f"{k:>10}" for k in keys))
    for name, m in rows.items():
        print(f"{name:24}" + "".join(f"{m[k]:>10.4f}" for k in keys))


if __name__ == "__main__":
    sys.exit(main())
