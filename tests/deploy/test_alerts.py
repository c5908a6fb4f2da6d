"""The PrometheusRule and the Grafana dashboard: promtool checks and unit-tests the rules, and
every series they read is one the server exports, with labels and values it really uses.
(tests/integration/test_deploy_metrics.py repeats the name check against a live server.)"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.manifests import (
    Objects,
    check_exprs,
    dashboard,
    dashboard_exprs,
    exported_offline,
    match_labels,
    metric_names,
    prometheus_rule,
    rule_exprs,
    selectors,
)

RULES_TEST = Path(__file__).with_name("alerts_test.yaml")


def promtool() -> str:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.skip("promtool is not installed (Debian/Ubuntu: apt-get install prometheus; .ci/run does it)")
    return exe


def write_rules(objects: Objects, directory: Path, descriptions: bool = True) -> Path:
    spec: dict[str, Any] = prometheus_rule(objects)["spec"]
    if not descriptions:
        spec = yaml.safe_load(yaml.safe_dump(spec))
        for group in spec["groups"]:
            for rule in group["rules"]:
                rule.get("annotations", {}).pop("description", None)
    path = directory / "adaptgate-rules.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_promtool_check_rules(objects: Objects, tmp_path: Path) -> None:
    exe = promtool()
    out = subprocess.run([exe, "check", "rules", str(write_rules(objects, tmp_path))], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_test_rules(objects: Objects, tmp_path: Path) -> None:
    exe = promtool()
    write_rules(objects, tmp_path, descriptions=False)
    shutil.copy(RULES_TEST, tmp_path / RULES_TEST.name)
    out = subprocess.run([exe, "test", "rules", RULES_TEST.name], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_is_unit_tested_firing(objects: Objects) -> None:
    alerts = {r["alert"] for g in prometheus_rule(objects)["spec"]["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    fired = {case["alertname"] for t in tests for case in t.get("alert_rule_test", []) if case.get("exp_alerts")}
    assert alerts == fired, f"alerts without a firing test: {sorted(alerts - fired)}; tests of unknown alerts: {sorted(fired - alerts)}"


def test_alerts_have_severity_summary_and_description(objects: Objects) -> None:
    for group in prometheus_rule(objects)["spec"]["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_the_alerts_cover_what_matters(objects: Objects) -> None:
    exprs = " ".join(expr for _, expr in rule_exprs(prometheus_rule(objects)))
    for needle in ("adaptgate_requests_total", "adaptgate_queue_depth", 'adaptgate_jobs{state="FAILED"}',
                   "adaptgate_rejected_total", "adaptgate_adapter_cache_events_total", 'method="LoadAdapter"'):
        assert needle in exprs, f"no alert reads {needle}"


def test_queue_alert_threshold_follows_max_queue_texts(objects: Objects) -> None:
    config = next(o for o in objects.of("ConfigMap") if o["metadata"]["name"].startswith("adaptgate-config"))
    limit = int(config["data"]["ADAPTGATE_MAX_QUEUE_TEXTS"])
    (expr,) = [e for name, e in rule_exprs(prometheus_rule(objects)) if name == "AdaptgateQueueSaturated"]
    assert re.search(rf"adaptgate_queue_depth\)\s*/\s*{limit}\b", expr), f"the queue alert must divide by ADAPTGATE_MAX_QUEUE_TEXTS={limit}: {expr}"


def test_alert_job_labels_are_monitored_services(objects: Objects) -> None:
    (monitor,) = objects.of("ServiceMonitor")
    monitored = {
        s["metadata"]["name"] for s in objects.of("Service")
        if all(s["metadata"].get("labels", {}).get(k) == v for k, v in match_labels(monitor["spec"]["selector"]).items())
    }
    exprs = [e for _, e in rule_exprs(prometheus_rule(objects))] + [e for _, e in dashboard_exprs(dashboard())]
    for expr in exprs:
        for _, matchers in selectors(expr):
            for label, op, value in matchers:
                if label == "job" and op == "=" and "$" not in value:
                    assert value in monitored, f"job={value!r} is not a Service the ServiceMonitor scrapes ({sorted(monitored)})"


# ----------------------------------------------------------------- names, labels, values

def test_alert_metrics_are_exported(objects: Objects) -> None:
    exported = exported_offline()
    problems = check_exprs(rule_exprs(prometheus_rule(objects)), exported.samples, exported.labels)
    assert not problems, "\n".join(problems)


def test_dashboard_metrics_are_exported() -> None:
    exported = exported_offline()
    problems = check_exprs(dashboard_exprs(dashboard()), exported.samples, exported.labels)
    assert not problems, "\n".join(problems)


def test_dashboard_shows_every_exported_metric() -> None:
    exported = exported_offline()
    used = {n for _, e in dashboard_exprs(dashboard()) for n in metric_names(e)}
    missing = [f for f in sorted(exported.families) if not any(u == f or u.startswith(f + "_") for u in used)]
    assert not missing, f"metrics with no dashboard panel: {missing}"


def test_dashboard_is_well_formed() -> None:
    board = dashboard()
    assert board["uid"] == "adaptgate" and board["schemaVersion"] >= 36
    variables = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "namespace", "job"} <= variables
    ids = []
    for panel in board["panels"]:
        ids.append(panel["id"])
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert 'namespace="$namespace"' in target["expr"], f"{panel['title']}: not filtered by namespace"
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_expression_parser_finds_names_and_labels() -> None:
    """The helper the checks above rely on, on the shapes the rules use."""
    expr = 'histogram_quantile(0.99, sum by (le, method) (rate(adaptgate_request_duration_seconds_bucket{method=~"Embed|Classify",code="OK"}[5m]))) > 1 or absent(up{job="adaptgate"})'
    assert metric_names(expr) == {"adaptgate_request_duration_seconds_bucket", "up"}
    assert selectors(expr)[0] == ("adaptgate_request_duration_seconds_bucket", [("method", "=~", "Embed|Classify"), ("code", "=", "OK")])
    assert metric_names("max by (pod) (adaptgate_queue_depth) / 4096 > 0.8") == {"adaptgate_queue_depth"}
    bad = check_exprs([("t", 'rate(adaptgate_requests_total{cod="OK"}[5m]) + adaptgate_nope')], exported_offline().samples, exported_offline().labels)
    assert any("adaptgate_nope" in p for p in bad) and any("'cod'" in p for p in bad)
