"""Promotion on live evidence: ``python -m training promote --live HOST:PORT``.

A server run with ``--shadow-alias candidate`` steps the candidate version beside the served
(production) one on the same monitored series and scores both as the actuals arrive
(serving.live). This reads its ``GetLiveAccuracy`` and moves ``production`` to the candidate only
when the candidate's live MASE beats production's over the same (forecast, actual) pairs -- same
series, targets and forecast origins, the same MASE scale -- by ``margin``:
``candidate < production x (1 - margin)``, with at least ``min_observations`` such pairs. The
decision and its figures are logged to the candidate's MLflow run (metrics ``live_mase``,
``live_mase_production``, ``live_pairs``; tags ``live_promotion``, ``live_promotion_reason``).

Only the serving side's gRPC client (serving.client: TLS, mutual TLS, a bearer token) is used here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from training.registry import CANDIDATE, PRODUCTION, Promotion, RegistryError, alias_version

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Evidence:
    served_version: str
    shadow_version: str
    pairs: int  # pairs with a MASE scale, scored by both
    mase_production: float
    mase_candidate: float
    mae_production: float
    mae_candidate: float
    table: str  # per horizon bucket, for the person at the terminal


def _pooled(buckets) -> tuple[int, float, float]:
    """(pairs with a scale, MASE, MAE) over every bucket."""
    n = sum(b.mase_scored for b in buckets)
    scored = sum(b.scored for b in buckets)
    mase = sum(b.mase * b.mase_scored for b in buckets) / n if n else float("nan")
    mae = sum(b.mae * b.scored for b in buckets) / scored if scored else float("nan")
    return n, mase, mae


def read_evidence(target: str, token_file: Path | None = None, timeout_s: float = 30.0, **tls: Any) -> Evidence:
    """Ask the server at target for its live accuracy; the served version beside which a shadow runs.

    ``token_file``: its first token is sent as a bearer token; ``tls``: serving.client.ForecastClient's
    TLS arguments (tls, tls_ca, tls_cert, tls_key, tls_server_name)."""
    import grpc

    from serving.client import ForecastClient
    from serving.errors import CredentialsError
    from serving.security import read_tokens

    try:
        token = read_tokens(Path(token_file), "--token-file")[0] if token_file is not None else None
        with ForecastClient(target, timeout_s, token=token, **tls) as client:
            live = client.live_accuracy()
    except grpc.RpcError as exc:
        raise RegistryError(f"GetLiveAccuracy on {target} failed: {exc.code().name}: {exc.details()}") from exc
    except (CredentialsError, ValueError) as exc:  # unusable TLS or token files
        raise RegistryError(f"cannot ask {target}: {exc}") from exc
    served = [v for v in live.versions if v.role == "served" and v.shadow_version]
    if not served:
        raise RegistryError(f"the server at {target} runs no shadow version (start it with --shadow-alias candidate)")
    prod = served[-1]
    cand = [v for v in live.versions if v.role == "shadow" and v.model_version == prod.shadow_version][-1]
    n_prod, mase_prod, mae_prod = _pooled(prod.versus_shadow)
    n_cand, mase_cand, mae_cand = _pooled(cand.since_load)
    rows = [f"{'steps ahead':>12} {'pairs':>8} {'MASE prod':>10} {'MASE cand':>10} {'MAE prod':>10} {'MAE cand':>10}"]
    for p, c in zip(prod.versus_shadow, cand.since_load):
        rows.append(
            f"{f'{p.from_step}-{p.to_step}':>12} {c.scored:>8} {p.mase:>10.4f} {c.mase:>10.4f} {p.mae:>10.4g} {c.mae:>10.4g}"
        )
    rows.append(f"{'all':>12} {n_cand:>8} {mase_prod:>10.4f} {mase_cand:>10.4f} {mae_prod:>10.4g} {mae_cand:>10.4g}")
    return Evidence(prod.model_version, cand.model_version, min(n_prod, n_cand), mase_prod, mase_cand, mae_prod,
                    mae_cand, "\n".join(rows))  # fmt: skip


def promote_live(
    name: str,
    target: str,
    min_observations: int = 1000,
    margin: float = 0.02,
    token_file: Path | None = None,
    **tls: Any,
) -> tuple[Promotion, Evidence]:
    """The live gate (see the module docstring); raises RegistryError when it cannot decide.
    ``tls``: as read_evidence."""
    evidence = read_evidence(target, token_file, **tls)
    client = MlflowClient()
    cand, prod = alias_version(client, name, CANDIDATE), alias_version(client, name, PRODUCTION)
    e = evidence
    if cand is None or str(cand.version) != e.shadow_version:
        decision = Promotion(
            False, e.shadow_version,
            f"the server's shadow runs version {e.shadow_version}, but {name}@{CANDIDATE} is "
            f"{cand.version if cand else 'not set'}: wait until the server follows the alias",
        )  # fmt: skip
    elif prod is not None and str(prod.version) != e.served_version:
        decision = Promotion(
            False, e.shadow_version,
            f"the server serves version {e.served_version}, but {name}@{PRODUCTION} is {prod.version}: "
            "wait until the server follows the alias",
        )  # fmt: skip
    elif e.pairs < min_observations:
        decision = Promotion(
            False, e.shadow_version,
            f"only {e.pairs} live pairs scored by both versions (--min-observations {min_observations}): not enough "
            f"evidence yet; version {e.shadow_version} stays {CANDIDATE!r}",
        )  # fmt: skip
    else:
        limit = e.mase_production * (1.0 - margin)
        if e.mase_candidate < limit:
            client.set_registered_model_alias(name, PRODUCTION, e.shadow_version)
            decision = Promotion(
                True, e.shadow_version,
                f"version {e.shadow_version} live MASE {e.mase_candidate:.4f} beats production version "
                f"{e.served_version} ({e.mase_production:.4f}) by more than margin {margin:g} (needs < {limit:.4f}) "
                f"over the same {e.pairs} pairs: it is now {PRODUCTION!r}",
            )  # fmt: skip
        else:
            decision = Promotion(
                False, e.shadow_version,
                f"version {e.shadow_version} live MASE {e.mase_candidate:.4f} does not beat production version "
                f"{e.served_version} ({e.mase_production:.4f}) by margin {margin:g} (needs < {limit:.4f}) over the "
                f"same {e.pairs} pairs; it stays {CANDIDATE!r}",
            )  # fmt: skip
    if cand is not None and cand.run_id and str(cand.version) == e.shadow_version:
        _log_decision(client, cand.run_id, decision, evidence, margin)
    log.info("live promotion of %s version %s: %s", name, e.shadow_version, decision.reason)
    return decision, evidence


def _log_decision(client: MlflowClient, run_id: str, decision: Promotion, e: Evidence, margin: float) -> None:
    for key, value in {
        "live_mase": e.mase_candidate, "live_mase_production": e.mase_production, "live_mae": e.mae_candidate,
        "live_mae_production": e.mae_production, "live_pairs": float(e.pairs), "live_margin": margin,
    }.items():  # fmt: skip
        client.log_metric(run_id, key, value)
    client.set_tag(run_id, "live_promotion", "promoted" if decision.promoted else "refused")
    client.set_tag(run_id, "live_promotion_reason", decision.reason[:5000])
    client.set_tag(run_id, "live_production_version", e.served_version)
