"""`python -m serving.healthcheck --target HOST:PORT [--service NAME] [--timeout S]`

Asks a server's standard grpc.health.v1 service whether NAME is SERVING, for the container
HEALTHCHECK and for exec probes: exit 0 when it is, else 1 with one line on stderr saying why.
It imports neither the server nor the generated forecast.v1 stubs, so it starts fast.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

FORECAST_SERVICE = "forecast.v1.Forecaster"  # the server also reports "" (the whole server)


def check(target: str, service: str = FORECAST_SERVICE, timeout_s: float = 3.0) -> str | None:
    """None when `service` at `target` reports SERVING, else one line saying why not."""
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return f"{target}: the health service knows no service {service!r}"
            return f"{target}: health check failed: {exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"{target}: service {service!r} is {status}"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m serving.healthcheck",
        description="Exit 0 when the server's grpc.health.v1 service says SERVING, else 1 with the reason.",
    )
    p.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT of the gRPC server")
    p.add_argument("--service", default=FORECAST_SERVICE, help='service name to ask about ("" for the server)')
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    args = p.parse_args(argv)
    if args.timeout <= 0:
        p.error("--timeout must be > 0 seconds")
    reason = check(args.target, args.service, args.timeout)
    if reason is not None:
        print(f"unhealthy: {reason}", file=sys.stderr)
        return 1
    print(f"healthy: {args.target} service {args.service!r} is SERVING")
    return 0


if __name__ == "__main__":
    sys.exit(main())
