"""The generated forecast.v1 stubs, imported from one place.

The stubs live in the gitignored package serving/_proto/, made by one command: `make protos`
(`python -m serving.protogen`; `make install`, `run`, `test` and the Dockerfile run it first).
Importing never writes them: stubs that are missing, or older than protos/ in a checkout, fail
the import with a message that says to run `make protos`. An image ships prebuilt stubs without
protos/, so there is nothing to compare them with.
"""

from __future__ import annotations

from serving import protogen

if protogen.PROTO_ROOT.exists() and protogen.stubs_are_stale():
    raise ImportError(
        f"the forecast.v1 gRPC stubs in {protogen.OUT_DIR} are missing or older than {protogen.PROTO_ROOT}: "
        "run `make protos`"
    )

try:
    from serving._proto.forecast.v1 import forecast_pb2 as pb
    from serving._proto.forecast.v1 import forecast_pb2_grpc as pb_grpc
except ImportError as exc:  # no protos/ to compare with (an image) and no stubs either
    raise ImportError(f"cannot import the forecast.v1 gRPC stubs ({exc}): run `make protos`") from exc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Forecaster"].full_name  # "forecast.v1.Forecaster"

__all__ = ["SERVICE_NAME", "pb", "pb_grpc"]
