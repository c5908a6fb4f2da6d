"""RELIABILITY 34: below the knee every request succeeds; far above it the only error is RESOURCE_EXHAUSTED;
and one tenant's flood neither refuses nor starves another tenant.

Uses bench/load.py's open-loop step (requests leave on schedule whether or not earlier ones
finished) and its closed loops, kept short for CI; `bench/load.py` itself draws the whole rate → p99
curve and runs the overload and fairness scenarios at length.
"""

from __future__ import annotations

import asyncio

import pytest

from bench.load import closed_loop, step
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


def test_a_flooding_tenant_neither_refuses_nor_starves_another(gateway: Gateway) -> None:
    """acme keeps twice its queued-texts budget in flight and retries refusals at once; globex sends
    8 texts at a time: none of globex's requests fails, and they wait a fraction of acme's queueing."""
    heavy, light = [f"flood message {i}: free prize, call now" for i in range(128)], TEXTS

    async def both():
        return await asyncio.gather(
            closed_loop(gateway.target, "acme-token", heavy, clients=16, seconds=8),
            closed_loop(gateway.target, "globex-token", light, clients=1, seconds=8),
        )

    flood, quiet = asyncio.run(both())
    assert set(quiet.codes) == {"OK"} and quiet.requests >= 5, quiet.codes
    assert flood.requests > 0 and set(flood.codes) <= {"OK", "RESOURCE_EXHAUSTED"}, flood.codes
    light_p50, heavy_p50 = quiet.percentiles_ms()[0], flood.percentiles_ms()[0]
    assert light_p50 < heavy_p50 / 3, (light_p50, heavy_p50)
