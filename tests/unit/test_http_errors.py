"""Every error kind has its HTTP status and reaches HTTP clients in OpenAI's error shape with its sentence."""

from __future__ import annotations

import json

import pytest

from adaptgate.api.http import error_response
from adaptgate.errors import AdaptgateError, ErrorCode

EXPECTED = {
    ErrorCode.INVALID_ARGUMENT: 400,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.PERMISSION_DENIED: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.ALREADY_EXISTS: 409,
    ErrorCode.FAILED_PRECONDITION: 412,
    ErrorCode.RESOURCE_EXHAUSTED: 429,
    ErrorCode.INTERNAL: 500,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.DEADLINE_EXCEEDED: 504,
}


@pytest.mark.parametrize("code", list(ErrorCode))
def test_each_error_kind_has_its_http_status_and_openai_body(code: ErrorCode) -> None:
    error = type(f"Some{code.name.title()}", (AdaptgateError,), {"code": code})("the sentence a user acts on")
    response = error_response(error)
    assert response.status_code == EXPECTED[code]
    assert json.loads(response.body) == {
        "error": {"message": "the sentence a user acts on", "type": code.value.lower(), "param": None, "code": code.value}
    }
    assert (response.headers.get("retry-after") is not None) == (code is ErrorCode.RESOURCE_EXHAUSTED)
