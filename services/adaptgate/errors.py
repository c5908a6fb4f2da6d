"""The error taxonomy shared by every layer.

Engine, adapters and training raise these without knowing gRPC; `api/errors.py` maps each
`ErrorCode` to a gRPC status in one table, so a new error class never needs a new handler.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.Enum):
    """Transport-neutral error kinds, named after the gRPC status each one maps to."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"


class AdaptgateError(Exception):
    """Base class: a human sentence plus the kind of failure."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(AdaptgateError):
    code = ErrorCode.INVALID_ARGUMENT


class NotFound(AdaptgateError):
    code = ErrorCode.NOT_FOUND


class AlreadyExists(AdaptgateError):
    code = ErrorCode.ALREADY_EXISTS


class PermissionDenied(AdaptgateError):
    code = ErrorCode.PERMISSION_DENIED


class Unauthenticated(AdaptgateError):
    code = ErrorCode.UNAUTHENTICATED


class ResourceExhausted(AdaptgateError):
    code = ErrorCode.RESOURCE_EXHAUSTED


class FailedPrecondition(AdaptgateError):
    code = ErrorCode.FAILED_PRECONDITION


class DeadlineExceeded(AdaptgateError):
    code = ErrorCode.DEADLINE_EXCEEDED


class Unavailable(AdaptgateError):
    code = ErrorCode.UNAVAILABLE


class InputTooLong(InvalidArgument):
    """A text is over the token limit and the request did not ask for truncation."""


class QueueFull(ResourceExhausted):
    """The batcher's queue is at its bound; the caller should retry later."""


class OutOfDeviceMemory(ResourceExhausted):
    """One input needs more accelerator (or host) memory than is free; its batch mates still run."""


class AdapterNotFound(NotFound):
    """Unknown adapter, or another tenant's: both give the same answer on purpose."""


class InvalidAdapter(InvalidArgument):
    """Malformed adapter files: bad JSON, not safetensors, missing tensors."""


class BaseModelMismatch(FailedPrecondition):
    """The adapter was built for another base model (shapes, modules or fingerprint)."""


class InvalidDataset(InvalidArgument):
    """The dataset cannot train anything; the message names rows."""


class UploadTooLarge(ResourceExhausted):
    """One upload passed its size limit; refused at the chunk that crossed it."""


class UploadsBusy(ResourceExhausted):
    """Too many uploads, or too many of their bytes, in flight for the tenant or the server."""


class QuotaExceeded(ResourceExhausted):
    """A tenant's stored bytes, adapter versions or datasets would pass its storage quota."""


class JobNotFound(NotFound):
    pass
