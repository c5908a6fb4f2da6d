"""RELIABILITY 34: below the knee every request succeeds; far above it the only error is RESOURCE_EXHAUSTED.

Uses bench/load.py's open-loop step (requests leave on schedule whether or not earlier ones
finished), kept short for CI; `bench/load.py` itself draws the whole rate → p99 curve.
"""

from __future__ import annotations

import asyncio

import pytest

from bench.load import step
from tests.integration.conftest import Gateway

pytestmark = pytest.mark.integration
TEXTS = ["a short message about lunch", "URGENT! you have won a prize, call now"] * 4


def test_gentle_load_has_no_errors(gateway: Gateway) -> None:
    result = asyncio.run(step(gateway.target, "acme-token", rate=5, seconds=3, texts=TEXTS))
    assert result["codes"] == {"OK": 15}, result
    assert result["p99_ms"] < 5000, result


def test_overload_is_refused_with_resource_exhausted_only(gateway: Gateway) -> None:
    result = asyncio.run(step(gateway.target, "acme-token", rate=400, seconds=1.5, texts=TEXTS * 8))
    codes = result["codes"]
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert codes.get("RESOURCE_EXHAUSTED", 0) > 0 and codes.get("OK", 0) > 0, codes
    after = asyncio.run(step(gateway.target, "acme-token", rate=2, seconds=1, texts=TEXTS))
    assert after["codes"] == {"OK": 2}, after  # healthy once the burst is over
