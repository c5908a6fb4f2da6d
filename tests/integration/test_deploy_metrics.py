"""deploy/ against a live gateway: the alert rules and the Grafana dashboard read only series
that the running server exports (names, labels and label values as they appear in /metrics),
and the image's HEALTHCHECK script sees it SERVING. The offline checks are in tests/deploy."""

from __future__ import annotations

import subprocess
import sys
import urllib.request

import grpc
import pytest
import yaml

from adaptgate.client import Client
from tests.deploy.manifests import DEPLOY, KUSTOMIZE, check_exprs, dashboard, dashboard_exprs, metric_names, parse_exposition
from tests.integration.conftest import Gateway

pytestmark = pytest.mark.integration


def _rule_exprs() -> list[tuple[str, str]]:
    """The PrometheusRule straight from the base manifests (no kubectl needed here)."""
    docs = yaml.safe_load_all((KUSTOMIZE / "base" / "monitoring.yaml").read_text())
    (rule,) = [d for d in docs if d and d["kind"] == "PrometheusRule"]
    return [(r["alert"], r["expr"]) for g in rule["spec"]["groups"] for r in g["rules"]]


@pytest.fixture(scope="module")
def live_metrics(gateway: Gateway) -> str:
    """/metrics after traffic: some series exist only once a request has used their labels."""
    client = Client(gateway.target, "acme-token")
    try:
        assert len(client.embed(["hello world", "deploy check"]).embeddings) == 2
        with pytest.raises(grpc.RpcError) as bad:
            client.embed([])  # INVALID_ARGUMENT
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as missing:
            client.classify(["x"], adapter="no-such-adapter")
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        client.close()
    with urllib.request.urlopen(gateway.metrics_url, timeout=10) as response:
        return response.read().decode()


def test_alert_rules_use_only_live_series(live_metrics: str) -> None:
    exported = parse_exposition(live_metrics)
    problems = check_exprs(_rule_exprs(), exported.samples, exported.labels)
    assert not problems, "\n".join(problems)


def test_dashboard_uses_only_live_series_and_shows_them_all(live_metrics: str) -> None:
    exported = parse_exposition(live_metrics)
    problems = check_exprs(dashboard_exprs(dashboard()), exported.samples, exported.labels)
    assert not problems, "\n".join(problems)
    used = {n for _, e in dashboard_exprs(dashboard()) for n in metric_names(e)}
    ours = sorted(f for f in exported.families if f.startswith("adaptgate_"))
    missing = [f for f in ours if not any(u == f or u.startswith(f + "_") for u in used)]
    assert not missing, f"live metrics with no dashboard panel: {missing}"


def test_live_request_labels_are_what_the_alerts_match(live_metrics: str) -> None:
    """The alerts match code names (OK, INVALID_ARGUMENT, ...) and method names (Embed, ...);
    families with no sample yet (rejections) are still declared, so the rules' names resolve."""
    from prometheus_client.parser import text_string_to_metric_families

    requests = {
        (s.labels["method"], s.labels["code"])
        for family in text_string_to_metric_families(live_metrics) if family.name == "adaptgate_requests"
        for s in family.samples if s.name == "adaptgate_requests_total"
    }
    assert {("Embed", "OK"), ("Embed", "INVALID_ARGUMENT"), ("Classify", "NOT_FOUND")} <= requests
    exported = parse_exposition(live_metrics)
    assert {"adaptgate_rejected_total", "adaptgate_jobs", "adaptgate_queue_depth", "adaptgate_adapter_load_seconds_bucket"} <= exported.samples


def test_image_healthcheck_script_sees_the_live_server_serving(gateway: Gateway) -> None:
    out = subprocess.run(
        [sys.executable, str(DEPLOY / "docker" / "healthcheck.py"), gateway.target],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith("SERVING")
