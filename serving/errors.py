"""Domain errors of the serving data plane, and the one place they become gRPC status codes.

The data plane raises these with a message for the client that says what was wrong and where
(series id, index in the request). Transports map them with `grpc_status`; anything else is a
bug: the client gets a fixed message with a reference id and the operator's log gets the traceback.
"""

from __future__ import annotations

import grpc


class ServingError(Exception):
    """Base class: the message is safe to show to a client."""

    # The configured limit this refusal enforces (the `limit` label of
    # forecast_limit_refusals_total), or None for errors that are not about a limit.
    limit: str | None = None


class InvalidInput(ServingError):
    """A request the client can fix: NaN, empty series id, timestamps going back, wrong shapes."""


class SeriesIdTooLong(InvalidInput):
    """A series id longer than --max-series-id-bytes (UTF-8 bytes)."""

    limit = "max_series_id_bytes"


class CapacityExceeded(ServingError):
    """A configured bound was reached (live-series cap, message size)."""


class LimitExceeded(CapacityExceeded):
    """A configured limit refused the request; `limit` names it (as the flag, without dashes)."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit


class Unauthenticated(ServingError):
    """No valid bearer token. One fixed message: it never says which part was missing or wrong."""


class UnknownModel(ServingError):
    """The request names a model this server does not serve."""


class ModelNotReady(ServingError):
    """No model is loaded and warmed up yet."""


class StatePreconditionFailed(ServingError):
    """A series' state cannot be used as asked (e.g. it belongs to another model version)."""


class ModelContractError(ServingError):
    """A model directory or graph does not follow the ONNX contract (CONTRACT §4)."""


class ModelLoadError(ServingError):
    """A model version could not be opened or warmed up."""


class RegistryUnavailable(ServingError):
    """The registry or its artifact store could not be reached, or answered with an error, while
    resolving an alias or downloading a version: worth retrying (the alias watch backs off)."""


class DeviceUnavailable(ServingError):
    """The requested execution device (e.g. CUDA) is not really usable."""


class CredentialsError(ServingError):
    """TLS or token files that cannot be used (unreadable, empty, not PEM, key not the cert's)."""


_GRPC_CODES: dict[type[ServingError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    CapacityExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    UnknownModel: grpc.StatusCode.NOT_FOUND,
    ModelNotReady: grpc.StatusCode.UNAVAILABLE,
    StatePreconditionFailed: grpc.StatusCode.FAILED_PRECONDITION,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
}

INTERNAL_MESSAGE = "internal server error (ref {ref}); the server log has the details"


def grpc_status(exc: BaseException, ref: str) -> tuple[grpc.StatusCode, str]:
    """(code, client message) for an exception raised while serving a request.

    `ref` ties the client's message to the operator's log line for errors that are bugs.
    """
    for cls in type(exc).__mro__:
        code = _GRPC_CODES.get(cls)  # type: ignore[arg-type]
        if code is not None:
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE.format(ref=ref)
