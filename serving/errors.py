"""Domain errors of the serving data plane, and the one place they become status codes.

The data plane raises these with a message for the client that says what was wrong and where
(series id, index in the request). Transports map them here -- gRPC with `grpc_status`, HTTP with
`http_status`, both from the one table below; anything else is a bug: the client gets a fixed
message with a reference id and the operator's log gets the traceback.
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


class UnknownSequence(InvalidInput):
    """A sequence request that does not start its sequence, for a sequence that is not live."""


class UnknownModel(ServingError):
    """The request names a model this server does not serve."""


class ModelNotReady(ServingError):
    """No model is loaded and warmed up yet."""


class Draining(ServingError):
    """The server is shutting down: a stream ends after the request it was answering."""

    def __init__(self, message: str = "server is shutting down; reconnect (series state on this server is gone)"):
        super().__init__(message)


class Unsupported(ServingError):
    """A method or feature of a protocol that this server does not implement."""


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


# The one map: each domain error's gRPC status code and HTTP status (the HTTP statuses follow
# google.rpc's mapping of the gRPC codes, but for 429 on a configured limit).
_STATUS: dict[type[ServingError], tuple[grpc.StatusCode, int]] = {
    InvalidInput: (grpc.StatusCode.INVALID_ARGUMENT, 400),
    CapacityExceeded: (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    UnknownModel: (grpc.StatusCode.NOT_FOUND, 404),
    ModelNotReady: (grpc.StatusCode.UNAVAILABLE, 503),
    Draining: (grpc.StatusCode.UNAVAILABLE, 503),
    StatePreconditionFailed: (grpc.StatusCode.FAILED_PRECONDITION, 400),
    Unauthenticated: (grpc.StatusCode.UNAUTHENTICATED, 401),
    Unsupported: (grpc.StatusCode.UNIMPLEMENTED, 501),
}
_INTERNAL = (grpc.StatusCode.INTERNAL, 500)

INTERNAL_MESSAGE = "internal server error (ref {ref}); the server log has the details"


def _status(exc: BaseException) -> tuple[grpc.StatusCode, int] | None:
    for cls in type(exc).__mro__:
        status = _STATUS.get(cls)  # type: ignore[arg-type]
        if status is not None:
            return status
    return None


def grpc_status(exc: BaseException, ref: str) -> tuple[grpc.StatusCode, str]:
    """(code, client message) for an exception raised while serving a request.

    `ref` ties the client's message to the operator's log line for errors that are bugs.
    """
    status = _status(exc)
    if status is None:
        return _INTERNAL[0], INTERNAL_MESSAGE.format(ref=ref)
    return status[0], str(exc)


def http_status(exc: BaseException, ref: str) -> tuple[int, grpc.StatusCode, str]:
    """(HTTP status, the gRPC code it stands for, client message), as `grpc_status`."""
    status = _status(exc)
    if status is None:
        return _INTERNAL[1], _INTERNAL[0], INTERNAL_MESSAGE.format(ref=ref)
    return status[1], status[0], str(exc)
