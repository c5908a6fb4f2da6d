"""Hot-swap under load: alias flips, a corrupt version and a load/unload storm while Classify traffic flows
(RELIABILITY 13, 17, 19): zero failed data requests, every answer from a version live during the request,
and every answer equal to what that version gives alone."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from adaptgate.client import Client
from adaptgate.engine.model import packaged_model_dir
from adaptgate.v1 import adapters_pb2
from tests.integration.conftest import Gateway
from tests.unit.peft_adapters import make_peft_adapter

pytestmark = pytest.mark.integration
TEXTS = ["free entry to win a prize", "see you at lunch", "call now for your reward", "thanks, talk soon"]
FLIPS = 100
STORM_MIN_CYCLES = 10  # the flips take over 3 s; a load/unload cycle takes milliseconds (tens on a busy machine)


def scores(response) -> np.ndarray:
    return np.array([[s.score for s in sorted(r.scores, key=lambda s: s.label)] for r in response.results])


def sharpen_head(path: Path) -> None:
    """A freshly initialised head answers ~1/3 for everything; scale it so two versions clearly differ."""
    from safetensors.torch import load, save

    tensors = load(path.read_bytes())
    tensors["base_model.model.classifier.weight"] = tensors["base_model.model.classifier.weight"] * 100
    path.write_bytes(save(tensors))


@pytest.fixture(scope="module")
def two_versions(gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    client = Client(gateway.target, "acme-token")
    refs = []
    for seed in (21, 22):
        out = tmp_path_factory.mktemp(f"swap{seed}")
        make_peft_adapter(packaged_model_dir(), out, num_labels=3, rank=4, seed=seed)
        sharpen_head(out / "adapter_model.safetensors")
        refs.append(client.upload_adapter(out, "live").ref)
    return refs[0], refs[1]


def test_alias_flips_under_traffic_never_fail_or_mix_versions(gateway: Gateway, two_versions, tmp_path: Path) -> None:
    v1, v2 = two_versions
    client = Client(gateway.target, "acme-token")
    md = client.metadata
    reference = {v: scores(client.classify(TEXTS, v)) for v in (v1, v2)}
    assert not np.allclose(reference[v1], reference[v2], atol=0.05)
    client.adapters.SetAlias(adapters_pb2.SetAliasRequest(ref=v1, alias="prod"), metadata=md)

    flips: list[tuple[float, float, str]] = [(0.0, time.monotonic(), v1)]
    answers: list[tuple[float, float, str, np.ndarray]] = []
    failures: list[BaseException] = []
    storm_errors: list[BaseException] = []
    storm_cycles = 0
    done = threading.Event()

    def traffic() -> None:
        own = Client(gateway.target, "acme-token")
        while not done.is_set():
            started = time.monotonic()
            try:
                response = own.classify(TEXTS, "live:prod")
                answers.append((started, time.monotonic(), response.adapter, scores(response)))
            except grpc.RpcError as exc:
                failures.append(exc)

    def storm() -> None:
        """No error is expected here (the server has slots to spare); any one, RPC or not, fails the test."""
        nonlocal storm_cycles
        own = Client(gateway.target, "acme-token")
        try:
            while not done.is_set():
                own.adapters.LoadAdapter(adapters_pb2.LoadAdapterRequest(ref=v2), metadata=own.metadata)
                own.adapters.UnloadAdapter(adapters_pb2.AdapterRef(ref=v2), metadata=own.metadata)
                storm_cycles += 1
        except BaseException as exc:  # a thread's exception is otherwise printed and lost
            storm_errors.append(exc)

    workers = [threading.Thread(target=traffic) for _ in range(4)] + [threading.Thread(target=storm)]
    for w in workers:
        w.start()
    try:
        for i in range(FLIPS):
            target = v2 if i % 2 == 0 else v1
            before = time.monotonic()
            client.adapters.SetAlias(adapters_pb2.SetAliasRequest(ref=target, alias="prod"), metadata=md)
            flips.append((before, time.monotonic(), target))
            if i == FLIPS // 2:
                corrupt = tmp_path / "corrupt"
                corrupt.mkdir()
                (corrupt / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "target_modules": ["query"]}')
                (corrupt / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
                with pytest.raises(grpc.RpcError) as info:
                    client.upload_adapter(corrupt, "live", alias="prod")
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            time.sleep(0.03)
    finally:
        done.set()
        for w in workers:
            w.join(timeout=60)

    assert not [w for w in workers if w.is_alive()], "a traffic or storm thread is still running after 60 s"
    assert not storm_errors, storm_errors
    assert storm_cycles >= STORM_MIN_CYCLES, f"the load/unload storm completed only {storm_cycles} cycles"
    assert not failures, failures[:3]
    assert len(answers) >= 50
    assert {a[2] for a in answers} == {v1, v2}
    for started, finished, version, got in answers:
        live_at_start = [v for _, after, v in flips if after <= started][-1]
        flipped_during = {v for before, after, v in flips if before <= finished and after >= started}
        assert version in {live_at_start} | flipped_during
        np.testing.assert_allclose(got, reference[version], atol=0.02)
    final = client.adapters.GetAdapter(adapters_pb2.AdapterRef(ref="live:prod"), metadata=md)
    assert final.ref == flips[-1][2]
