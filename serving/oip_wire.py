"""ModelInferResponse and ModelStreamInferResponse written straight to protobuf wire bytes.

ModelStreamInfer answers one observation per message at stream rates; building the response with
the generated classes (a message, an output tensor, its shape, the raw bytes) costs several µs of
Python per answer. Here the parts that repeat -- model name and version, the output tensor's
name, datatype and shape -- are encoded once and cached, and an answer is a join of a few byte
strings. Ordinary proto3 wire format: tests parse it with tritonclient's own classes.

Field numbers (protos/inference/grpc_service.proto, Triton's):
  ModelInferResponse: model_name 1, model_version 2, id 3, outputs 5, raw_output_contents 6
  InferOutputTensor: name 1, datatype 2, shape 3 (packed int64)
  ModelStreamInferResponse: error_message 1, infer_response 2
"""

from __future__ import annotations

from functools import lru_cache

from serving.wire import varint


def _field(tag: int, data: bytes) -> bytes:
    """A length-delimited field: tag byte, length, data."""
    return bytes((tag,)) + varint(len(data)) + data


@lru_cache(maxsize=256)
def _model_fields(model_name: str, model_version: str) -> bytes:
    return _field(0x0A, model_name.encode()) + _field(0x12, model_version.encode())


@lru_cache(maxsize=256)
def _output_field(name: str, datatype: str, shape: tuple[int, ...]) -> bytes:
    dims = b"".join(varint(d) for d in shape)
    tensor = _field(0x0A, name.encode()) + _field(0x12, datatype.encode()) + _field(0x1A, dims)
    return _field(0x2A, tensor)


def infer_response(
    model_name: str, model_version: str, request_id: str, name: str, datatype: str, shape: tuple[int, ...], raw: bytes
) -> bytes:
    """A ModelInferResponse with one output tensor whose data is `raw` (little-endian, row-major)."""
    parts = [_model_fields(model_name, model_version)]
    if request_id:
        parts.append(_field(0x1A, request_id.encode()))
    parts += (_output_field(name, datatype, shape), b"\x32", varint(len(raw)), raw)
    return b"".join(parts)


def stream_response(infer: bytes) -> bytes:
    """A ModelStreamInferResponse carrying an encoded ModelInferResponse."""
    return b"\x12" + varint(len(infer)) + infer


def stream_error(message: str, model_name: str, model_version: str, request_id: str) -> bytes:
    """A ModelStreamInferResponse with error_message set; its infer_response names the model and
    echoes the request id, so clients that read it can tell which request failed."""
    infer = _model_fields(model_name, model_version) + (_field(0x1A, request_id.encode()) if request_id else b"")
    return _field(0x0A, message.encode()) + stream_response(infer)
