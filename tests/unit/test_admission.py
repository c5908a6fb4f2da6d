"""Admission by texts and adapters, per tenant and global, before any tokenizing or adapter loading."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

from adaptgate.adapters.refs import AdapterRef
from adaptgate.api import admission as admission_module
from adaptgate.api.admission import AdapterSlotsBusy, RefusalPacer, TenantAdaptersBusy, TenantAdmission, TenantQueueFull
from adaptgate.api.auth import Principal, TokenAuthenticator
from adaptgate.api.classifier import ClassifierServicer
from adaptgate.api.embeddings import EmbeddingsServicer
from adaptgate.api.rpc import RpcRuntime
from adaptgate.engine.engine import Engine, EngineConfig
from adaptgate.engine.model import load_base_model
from adaptgate.errors import InvalidArgument, QueueFull
from adaptgate.inference import Inference
from adaptgate.metrics import Metrics
from adaptgate.v1 import classifier_pb2, embeddings_pb2


def ref(name: str, tenant: str = "acme") -> AdapterRef:
    return AdapterRef(tenant, name)


def test_a_tenant_at_its_texts_budget_is_refused_and_other_tenants_are_not() -> None:
    admission = TenantAdmission(0, max_queued_texts=100, max_queued_texts_per_tenant=40)
    with admission.admit("acme", rows=30):
        with pytest.raises(TenantQueueFull, match="40"):
            with admission.admit("acme", rows=20):
                pass
        with admission.admit("globex", rows=40):  # another tenant has its own budget
            pass
    with admission.admit("acme", rows=20), admission.admit("acme", rows=20):  # texts come back when answered
        pass


def test_the_global_texts_budget_is_shared_by_all_tenants() -> None:
    admission = TenantAdmission(0, max_queued_texts=100, max_queued_texts_per_tenant=60)
    with admission.admit("acme", rows=60), admission.admit("globex", rows=40):
        with pytest.raises(QueueFull, match="100"):
            with admission.admit("initech", rows=1):
                pass
    with admission.admit("initech", rows=60):
        pass


def test_a_request_that_can_never_fit_is_invalid_argument_even_when_idle() -> None:
    admission = TenantAdmission(
        0, max_queued_texts=30, max_queued_texts_per_tenant=40, max_leased_adapters=8, max_leased_adapters_per_tenant=2
    )
    with pytest.raises(InvalidArgument, match="30"):  # the global budget is the smaller one here
        with admission.admit("acme", rows=31):
            pass
    with pytest.raises(InvalidArgument, match="2 adapters"):
        with admission.admit("acme", rows=1, adapters=[ref("a"), ref("b"), ref("c")]):
            pass
    with admission.admit("acme", rows=30, adapters=[ref("a"), ref("b")]):  # exactly at the limits: admitted
        pass


def test_a_tenant_leases_at_most_its_budget_of_distinct_adapters() -> None:
    admission = TenantAdmission(0, max_leased_adapters=3, max_leased_adapters_per_tenant=2)
    with admission.admit("acme", rows=1, adapters=[ref("a")]):
        for _ in range(10):  # the same adapter in many requests is one slot
            with admission.admit("acme", rows=1, adapters=[ref("a")]):
                pass
        with admission.admit("acme", rows=1, adapters=[ref("b")]):
            with pytest.raises(TenantAdaptersBusy, match="2 distinct adapters"):
                with admission.admit("acme", rows=1, adapters=[ref("c")]):
                    pass
            with admission.admit("globex", rows=1, adapters=[ref("x", "globex")]):  # 3 slots in use: full
                with pytest.raises(AdapterSlotsBusy, match="3"):
                    with admission.admit("initech", rows=1, adapters=[ref("y", "initech")]):
                        pass
                with admission.admit("initech", rows=1, adapters=[ref("a")]):  # already leased: no new slot
                    pass
        with admission.admit("acme", rows=1, adapters=[ref("c")]):  # b was released
            pass


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details


class Context:
    def __init__(self, token: str, remaining: float | None = None) -> None:
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.trailing: tuple = ()
        self.remaining = remaining

    def invocation_metadata(self):
        return self.metadata

    def time_remaining(self) -> float | None:
        return self.remaining

    def set_trailing_metadata(self, metadata) -> None:
        self.trailing = metadata

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


class CacheSpy:
    """Records every lease; a refused request must never reach the adapter cache."""

    def __init__(self) -> None:
        self.leased: list[AdapterRef] = []

    def lease(self, ref: AdapterRef):
        self.leased.append(ref)
        raise AssertionError(f"adapter {ref} was leased")


TOKENS = {"acme-token": Principal("acme"), "globex-token": Principal("globex"), "initech-token": Principal("initech")}


@asynccontextmanager
async def serving(
    tiny_bert_dir: Path, refusal_rate_per_tenant: float = 0.0
) -> AsyncIterator[tuple[EmbeddingsServicer, ClassifierServicer, TenantAdmission, list[int]]]:
    """Real servicers, inference and engine (tiny BERT); the engine's tokenizer counts its calls."""
    engine = Engine(load_base_model(tiny_bert_dir, dtype="float32", device="cpu"), EngineConfig(cpu_kernels=False))
    tokenized: list[int] = []
    token_ids = engine._token_ids

    def counting(texts: list[str], truncate: bool, *args: object) -> list[list[int]]:
        tokenized.append(len(texts))
        return token_ids(texts, truncate, *args)

    engine._token_ids = counting  # type: ignore[method-assign]
    admission = TenantAdmission(
        0, max_queued_texts=8, max_queued_texts_per_tenant=4, max_leased_adapters=8, max_leased_adapters_per_tenant=2,
        refusal_rate_per_tenant=refusal_rate_per_tenant,
    )
    runtime = RpcRuntime(TokenAuthenticator(TOKENS), Metrics(), admission)
    inference = Inference(engine, CacheSpy(), max_texts=100)  # type: ignore[arg-type]
    engine.start()
    try:
        yield EmbeddingsServicer(runtime, inference, "tiny"), ClassifierServicer(runtime, inference), admission, tokenized
    finally:
        await engine.stop()


def embed(*texts: str) -> embeddings_pb2.EmbedRequest:
    return embeddings_pb2.EmbedRequest(texts=list(texts))


@pytest.mark.timeout(120)
async def test_a_refused_request_is_never_tokenized(tiny_bert_dir: Path) -> None:
    """Over a tenant's or the global texts budget: RESOURCE_EXHAUSTED with a retry hint, counted by
    reason, and the tokenizer never ran; a request larger than any budget: INVALID_ARGUMENT, no hint."""
    async with serving(tiny_bert_dir) as (embeddings, _, admission, tokenized):
        await _refused_embeds(embeddings, admission, tokenized)


async def _refused_embeds(embeddings: EmbeddingsServicer, admission: TenantAdmission, tokenized: list[int]) -> None:
    rejected = embeddings.runtime.metrics.rejected
    with admission.admit("acme", rows=4):  # acme's texts budget is in use
        context = Context("acme-token")
        with pytest.raises(Aborted) as aborted:
            await embeddings.Embed(embed("one more text"), context)
        assert aborted.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, aborted.value.details
        assert context.trailing == (("retry-after-ms", "250"),)
        assert rejected.labels("tenant_queue_full")._value.get() == 1
        with admission.admit("globex", rows=4):  # now the global budget (8) is in use too
            with pytest.raises(Aborted) as aborted:
                await embeddings.Embed(embed("hello"), Context("initech-token"))
            assert aborted.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert rejected.labels("queue_full")._value.get() == 1
    assert tokenized == []
    context = Context("initech-token")
    with pytest.raises(Aborted) as aborted:
        await embeddings.Embed(embed(*["text"] * 5), context)
    assert aborted.value.code == grpc.StatusCode.INVALID_ARGUMENT and "split" in aborted.value.details
    assert context.trailing == () and tokenized == []
    answer = await embeddings.Embed(embed("hello", "world"), Context("acme-token"))  # budgets came back
    assert len(answer.embeddings) == 2 and tokenized == [2]


@pytest.mark.timeout(120)
async def test_a_classify_over_the_adapter_budget_is_refused_before_tokens_or_leases(tiny_bert_dir: Path) -> None:
    """Adapters are counted before any is resolved or leased; a Classify's texts count once per adapter."""
    async with serving(tiny_bert_dir) as (_, classifier, admission, tokenized):
        await _refused_classifies(classifier, admission, tokenized)


async def _refused_classifies(classifier: ClassifierServicer, admission: TenantAdmission, tokenized: list[int]) -> None:
    three = classifier_pb2.ClassifyRequest(texts=["hello"], adapters=["spam", "topic", "lang"])
    with pytest.raises(Aborted) as aborted:  # 3 adapters, the tenant may lease 2: never fits
        await classifier.Classify(three, Context("acme-token"))
    assert aborted.value.code == grpc.StatusCode.INVALID_ARGUMENT and "2 adapters" in aborted.value.details
    with admission.admit("acme", rows=1, adapters=[ref("x"), ref("y")]):  # acme's two adapters are in use
        with pytest.raises(Aborted) as aborted:
            await classifier.Classify(classifier_pb2.ClassifyRequest(texts=["hi"], adapter="spam"), Context("acme-token"))
        assert aborted.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert classifier.runtime.metrics.rejected.labels("tenant_adapters_busy")._value.get() == 1
    six_rows = classifier_pb2.ClassifyRequest(texts=["a", "b", "c"], adapters=["spam", "topic"])
    with pytest.raises(Aborted) as aborted:  # 3 texts x 2 adapters = 6 rows, the tenant may queue 4
        await classifier.Classify(six_rows, Context("acme-token"))
    assert aborted.value.code == grpc.StatusCode.INVALID_ARGUMENT and "6" in aborted.value.details
    assert tokenized == [] and classifier.inference.cache.leased == []


def test_refusals_past_the_rate_wait_their_turn_per_tenant_and_in_all() -> None:
    """10 refusals/s with a burst of one second's worth: 11 at once, then one every 0.1 s."""
    pacer = RefusalPacer(rate_per_tenant=10, rate=0)
    held = [pacer.reserve("acme", now=100.0) for _ in range(14)]
    assert held[:11] == [0.0] * 11 and held[11:] == pytest.approx([0.1, 0.2, 0.3])
    assert pacer.reserve("globex", now=100.0) == 0.0  # another tenant has its own turns
    assert pacer.reserve("acme", now=102.0) == 0.0  # the backlog of turns has passed
    shared = RefusalPacer(rate_per_tenant=0, rate=10)
    held = [shared.reserve(f"tenant-{i}", now=100.0) for i in range(12)]
    assert held[:11] == [0.0] * 11 and held[11] == pytest.approx(0.1)


@pytest.mark.timeout(120)
async def test_a_client_retrying_at_once_is_held_to_its_refusal_rate(tiny_bert_dir: Path, monkeypatch) -> None:
    """Past 5 refusals/s (a burst of 6), each refused Embed waits its turn before RESOURCE_EXHAUSTED
    comes back; another tenant's refusals are not held. The wait is a timer: here, a recorder."""
    holds: list[float] = []

    async def hold(seconds: float) -> None:
        holds.append(seconds)

    monkeypatch.setattr(admission_module, "asyncio", SimpleNamespace(sleep=hold))
    async with serving(tiny_bert_dir, refusal_rate_per_tenant=5) as (embeddings, _, admission, tokenized):
        with admission.admit("acme", rows=4), admission.admit("globex", rows=4):
            for _ in range(8):
                with pytest.raises(Aborted) as aborted:
                    await embeddings.Embed(embed("again"), Context("acme-token"))
                assert aborted.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert holds == pytest.approx([0.2, 0.4], abs=0.05)
            with pytest.raises(Aborted) as aborted:  # its turn is 0.6 s away, its deadline 0.35 s
                await embeddings.Embed(embed("again"), Context("acme-token", remaining=0.35))
            assert aborted.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert holds[2] == pytest.approx(0.25, abs=0.05)  # answered 0.1 s before the deadline
            with pytest.raises(Aborted):  # 0.15 s left: an answer now would only invite a retry
                await embeddings.Embed(embed("again"), Context("acme-token", remaining=0.15))
            assert holds[3] == pytest.approx(0.15, abs=0.05)  # held to the deadline (gRPC ends the call there)
            with pytest.raises(Aborted):
                await embeddings.Embed(embed("hi"), Context("globex-token"))
            assert len(holds) == 4
        assert embeddings.runtime.metrics.rejected.labels("tenant_queue_full")._value.get() == 11
        assert tokenized == []


class FixedRate:
    """The engine's measured rows per second, fixed for the test (None: nothing measured yet)."""

    def __init__(self, rows_per_second: float | None) -> None:
        self.rows_per_second = rows_per_second


async def test_work_that_cannot_be_answered_before_its_deadline_is_refused_before_it_starts() -> None:
    import time

    admission = TenantAdmission(0, max_queued_texts=4096, max_queued_texts_per_tenant=1024, rate=FixedRate(100.0))
    now = time.monotonic()
    async with admission.admitted("flood", rows=500):  # 5 s of work at 100 rows/s
        with pytest.raises(admission_module.DeadlineTooShort, match="deadline"):
            async with admission.admitted("flood", rows=100, deadline=now + 1.0):  # waits behind its own 500 rows
                pass
        async with admission.admitted("flood", rows=100, deadline=now + 60.0):  # time enough
            pass
        async with admission.admitted("light", rows=8, deadline=now + 1.0):  # fair turns: ~0.16 s, not 5 s
            pass
    unmeasured = TenantAdmission(0, rate=FixedRate(None))
    async with unmeasured.admitted("flood", rows=500), unmeasured.admitted("flood", rows=100, deadline=now + 0.5):
        pass  # before the engine has measured its rate nothing is refused for it


def test_the_row_rate_follows_the_engines_recent_batches() -> None:
    from adaptgate.engine.batcher import BatchStats
    from adaptgate.engine.rate import RowRate

    rate = RowRate()
    assert rate.rows_per_second is None
    for _ in range(50):
        rate.observe(BatchStats(rows=64, tokens=640, padded_tokens=640, adapters=0, seconds=0.1))
    assert rate.rows_per_second == pytest.approx(640.0)
    for _ in range(100):  # the engine slows down (longer texts): the estimate follows within about a hundred batches
        rate.observe(BatchStats(rows=64, tokens=6400, padded_tokens=6400, adapters=0, seconds=0.4))
    assert rate.rows_per_second == pytest.approx(160.0, rel=0.05)
