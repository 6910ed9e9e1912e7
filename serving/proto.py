"""The generated stubs (forecast.v1 and the Open Inference Protocol's `inference`), imported from
one place, and the descriptor pool server reflection answers from.

The stubs live in the gitignored package serving/_proto/, made by one command: `make protos`
(`python -m serving.protogen`; `make install`, `run`, `test` and the Dockerfile run it first).
Importing never writes them: stubs that are missing, or older than protos/ in a checkout, fail
the import with a message that says to run `make protos`. An image ships prebuilt stubs without
protos/, so there is nothing to compare them with.
"""

from __future__ import annotations

from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FileDescriptor

from serving import protogen

if protogen.PROTO_ROOT.exists() and protogen.stubs_are_stale():
    raise ImportError(
        f"the gRPC stubs in {protogen.OUT_DIR} are missing or older than {protogen.PROTO_ROOT}: run `make protos`"
    )

try:
    from serving._proto.forecast.v1 import forecast_pb2 as pb
    from serving._proto.forecast.v1 import forecast_pb2_grpc as pb_grpc
    from serving._proto.inference import grpc_service_pb2 as oip
    from serving._proto.inference import model_config_pb2 as oip_config
except ImportError as exc:  # pragma: no cover - only on a broken checkout
    raise ImportError(f"cannot import the generated gRPC stubs ({exc}): run `make protos`") from exc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Forecaster"].full_name  # "forecast.v1.Forecaster"
OIP_SERVICE_NAME = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name  # "inference.GRPCInferenceService"


def reflection_pool(*files: FileDescriptor) -> descriptor_pool.DescriptorPool:
    """A pool holding these files and everything they import, for server reflection.

    The `inference` stubs live in a pool of their own (serving/protogen.py says why), so no
    single existing pool describes every service; this one is built from the files' serialized
    descriptors, under their canonical names.
    """
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        pool.AddSerializedFile(file.serialized_pb)
        added.add(file.name)

    for file in files:
        add(file)
    return pool


__all__ = ["OIP_SERVICE_NAME", "SERVICE_NAME", "oip", "oip_config", "pb", "pb_grpc", "reflection_pool"]
