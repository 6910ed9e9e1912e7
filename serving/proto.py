"""The generated forecast.v1 stubs, imported from one place.

The stubs live in the gitignored package serving/_proto/ made by `make protos`. When they are
missing or older than protos/ and grpc_tools is installed (a dev checkout) they are regenerated
here; otherwise the import fails with a message that says what to run.
"""

from __future__ import annotations

import logging

from serving import protogen

log = logging.getLogger(__name__)


def _ensure_stubs() -> None:
    if protogen.PROTO_ROOT.exists() and protogen.stubs_are_stale():
        try:
            import grpc_tools  # noqa: F401
        except ImportError:
            if not (protogen.OUT_DIR / "__init__.py").exists():
                raise ImportError(
                    "the forecast.v1 gRPC stubs are missing: run `make protos` "
                    "(needs grpcio-tools from requirements/dev.txt)"
                ) from None
            return  # stale but usable, and nothing here can rebuild them
        log.info("event=protos_regenerated out=%s", protogen.OUT_DIR)
        protogen.generate()


_ensure_stubs()

try:
    from serving._proto.forecast.v1 import forecast_pb2 as pb
    from serving._proto.forecast.v1 import forecast_pb2_grpc as pb_grpc
except ImportError as exc:  # pragma: no cover - only on a broken checkout
    raise ImportError(f"cannot import the forecast.v1 gRPC stubs ({exc}): run `make protos`") from exc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Forecaster"].full_name  # "forecast.v1.Forecaster"

__all__ = ["SERVICE_NAME", "pb", "pb_grpc"]
