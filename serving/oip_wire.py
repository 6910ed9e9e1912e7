"""ModelInferResponse and ModelStreamInferResponse written straight to protobuf wire bytes.

ModelStreamInfer answers one observation per message at stream rates; building the response with
the generated classes (a message, an output tensor, its shape, the raw bytes) costs several µs of
Python per answer. Here the parts that repeat -- model name and version, the output tensor's
name, datatype and shape -- are encoded once and cached, and an answer is one join of a few byte
strings. Ordinary proto3 wire format (fields in any order are valid): tests parse it with
tritonclient's own classes.

Field numbers (protos/inference/grpc_service.proto, Triton's):
  ModelInferResponse: model_name 1, model_version 2, id 3, outputs 5, raw_output_contents 6
  InferOutputTensor: name 1, datatype 2, shape 3 (packed int64)
  ModelStreamInferResponse: error_message 1, infer_response 2
"""

from __future__ import annotations

from functools import lru_cache

from serving.wire import varint, varint_of


def _field(tag: int, data: bytes) -> bytes:
    """A length-delimited field: tag byte, length, data."""
    return bytes((tag,)) + varint_of(len(data)) + data


@lru_cache(maxsize=256)
def _model_fields(model_name: str, model_version: str) -> bytes:
    return _field(0x0A, model_name.encode()) + _field(0x12, model_version.encode())


@lru_cache(maxsize=1024)
def _head(model_name: str, model_version: str, name: str, datatype: str, shape: tuple[int, ...]) -> bytes:
    """model_name, model_version and the output tensor's description: what answers share.
    (Fields may come in any order on the wire; the id follows them.)"""
    dims = b"".join(varint(d) for d in shape)
    tensor = _field(0x0A, name.encode()) + _field(0x12, datatype.encode()) + _field(0x1A, dims)
    return _model_fields(model_name, model_version) + _field(0x2A, tensor)


def infer_response(
    model_name: str,
    model_version: str,
    request_id: str,
    name: str,
    datatype: str,
    shape: tuple[int, ...],
    raw: bytes,
    stream: bool = False,
) -> bytes:
    """A ModelInferResponse with one output tensor whose data is `raw` (little-endian,
    row-major); with stream=True, wrapped as a ModelStreamInferResponse's infer_response."""
    head = _head(model_name, model_version, name, datatype, shape)
    rid = _field(0x1A, request_id.encode()) if request_id else b""
    size = varint_of(len(raw))
    if not stream:
        return b"".join((head, rid, b"\x32", size, raw))
    inner = len(head) + len(rid) + 1 + len(size) + len(raw)
    return b"".join((b"\x12", varint_of(inner), head, rid, b"\x32", size, raw))


def stream_error(message: str, model_name: str, model_version: str, request_id: str) -> bytes:
    """A ModelStreamInferResponse with error_message set; its infer_response names the model and
    echoes the request id, so clients that read it can tell which request failed."""
    infer = _model_fields(model_name, model_version) + (_field(0x1A, request_id.encode()) if request_id else b"")
    return _field(0x0A, message.encode()) + _field(0x12, infer)
