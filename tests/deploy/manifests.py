"""Shared by the deploy tests: render the kustomize overlays, read the alert rules and the
dashboard, and list the metric names that adaptgate's Metrics registry exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import grpc
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUSTOMIZE = DEPLOY / "kustomize"
OVERLAYS = sorted(p.name for p in (KUSTOMIZE / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
# What each overlay promises, so the tests know what to hold it to: "gpu" = CUDA inference and a
# GPU Ray worker group; "ha" = several control replicas on PostgreSQL (components/ha). A new
# overlay must be listed here (tests/deploy checks that every overlay directory is).
OVERLAY_TRAITS: dict[str, frozenset[str]] = {
    "cpu": frozenset(),
    "gpu": frozenset({"gpu"}),
    "ha": frozenset({"ha"}),
    "gpu-ha": frozenset({"gpu", "ha"}),
}
CRDS = DEPLOY / "crds"
DASHBOARD = KUSTOMIZE / "base" / "dashboards" / "adaptgate.json"
SETTINGS_ENV = KUSTOMIZE / "base" / "settings.env"
NAMESPACE = "adaptgate"
# The server's own Prometheus-synthesised series that alerts may use besides adaptgate_*.
PROMETHEUS_SERIES = {"up"}
# Labels Prometheus adds to every scraped series (ServiceMonitor defaults) and histogram buckets' le.
TARGET_LABELS = {"namespace", "job", "pod", "instance", "service", "endpoint", "container", "le"}


def kubectl() -> str | None:
    return shutil.which("kubectl")


@cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    """`kubectl kustomize` of one overlay (kustomize 5.x built into kubectl)."""
    exe = kubectl()
    assert exe is not None
    out = subprocess.run(
        [exe, "kustomize", str(KUSTOMIZE / "overlays" / overlay)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, f"kubectl kustomize overlays/{overlay} failed:\n{out.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


@dataclass
class Objects:
    items: tuple[dict[str, Any], ...]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.items if o["kind"] == kind]

    def one(self, kind: str, name: str) -> dict[str, Any]:
        found = [o for o in self.of(kind) if o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
        return found[0]

    def named_prefix(self, kind: str, prefix: str) -> dict[str, Any]:
        """Generated ConfigMaps/Secrets carry a hash suffix: find one by its base name."""
        found = [o for o in self.of(kind) if re.fullmatch(rf"{re.escape(prefix)}(-[a-z0-9]{{10}})?", o["metadata"]["name"])]
        assert len(found) == 1, f"expected one {kind} named {prefix}[-hash], found {[o['metadata']['name'] for o in found]}"
        return found[0]

    def deployments(self) -> list[dict[str, Any]]:
        return self.of("Deployment")


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"].get("labels", {})


def selects(match: dict[str, str], labels: dict[str, str]) -> bool:
    """A matchLabels map (or a Service's selector) against a set of labels."""
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def match_labels(selector: dict[str, Any]) -> dict[str, str]:
    assert "matchExpressions" not in selector, "selectors in deploy/ use matchLabels only"
    return selector.get("matchLabels", {})


def containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(pod_spec.get("containers", [])) + list(pod_spec.get("initContainers", []))


def all_pod_specs(objects: Objects) -> Iterator[tuple[str, dict[str, Any]]]:
    """(owner description, pod spec) for every pod template: Deployments and RayCluster groups."""
    for dep in objects.deployments():
        yield f"Deployment/{dep['metadata']['name']}", dep["spec"]["template"]["spec"]
    for rc in objects.of("RayCluster"):
        yield f"RayCluster/{rc['metadata']['name']}/head", rc["spec"]["headGroupSpec"]["template"]["spec"]
        for group in rc["spec"].get("workerGroupSpecs", []):
            yield f"RayCluster/{rc['metadata']['name']}/{group['groupName']}", group["template"]["spec"]


# The variables a manifest may fill from elsewhere (valueFrom), with the source each must use and
# a stand-in value for it: the tests cannot read a Secret the operator creates in the cluster.
VALUE_FROM: dict[str, tuple[str, str]] = {
    "ADAPTGATE_DATABASE_URL": ("secretKeyRef", "postgresql://adaptgate:stand-in@postgres.example:5432/adaptgate"),
    "ADAPTGATE_REPLICA_ID": ("fieldRef", "adaptgate-control-5d8f7c9b4-x2k8q"),
}


def effective_env(container: dict[str, Any], objects: Objects) -> dict[str, str]:
    """envFrom ConfigMaps first, then env (which wins), as the kubelet does; a valueFrom becomes
    the stand-in value of VALUE_FROM."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        env.update(objects.one("ConfigMap", ref).get("data", {}))
    for var in container.get("env", []):
        if "valueFrom" in var:
            assert var["name"] in VALUE_FROM, f"unexpected valueFrom for {var['name']}"
            source, stand_in = VALUE_FROM[var["name"]]
            assert set(var["valueFrom"]) == {source}, f"{var['name']} must come from a {source}, not {var['valueFrom']}"
            env[var["name"]] = stand_in
        else:
            env[var["name"]] = var.get("value", "")
    return env


def env_var(container: dict[str, Any], name: str) -> dict[str, Any] | None:
    """A container's own `env` entry for one variable (None when only envFrom could set it)."""
    found = [v for v in container.get("env", []) if v["name"] == name]
    assert len(found) <= 1, f"{container['name']} sets {name} twice"
    return found[0] if found else None


def port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    assert port in named, f"container {container['name']} has no port named {port!r} (has {sorted(named)})"
    return named[port]


@dataclass
class SettingsEnv:
    """The gateway's Settings fields and the env var names that set each."""

    env_names: dict[str, str] = field(default_factory=dict)  # env var -> field

    @classmethod
    def load(cls) -> "SettingsEnv":
        from adaptgate.settings import Settings as S

        prefix = S.model_config.get("env_prefix", "")
        names: dict[str, str] = {}
        for name, info in S.model_fields.items():
            alias = info.validation_alias
            choices = getattr(alias, "choices", None) or ([alias] if isinstance(alias, str) else [])
            env_choices = [c for c in choices if isinstance(c, str) and c.isupper()]
            for env in env_choices or [f"{prefix}{name}".upper()]:
                names[env.upper()] = name
        return cls(names)


def settings_env_commented() -> dict[str, str]:
    """`# ADAPTGATE_X=value` lines of settings.env: optional settings documented but left unset."""
    found = {}
    for line in SETTINGS_ENV.read_text().splitlines():
        if m := re.fullmatch(r"#\s*((?:ADAPTGATE|RAY)_[A-Z0-9_]+)=(.*)", line.strip()):
            found[m[1]] = m[2]
    return found


# ---------------------------------------------------------------- alert rules and dashboard

def prometheus_rule(objects: Objects) -> dict[str, Any]:
    rules = objects.of("PrometheusRule")
    assert len(rules) == 1
    return rules[0]


def rule_exprs(rule: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (r.get("alert") or r.get("record"), r["expr"]) for group in rule["spec"]["groups"] for r in group["rules"]
    ]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs(board: dict[str, Any]) -> list[tuple[str, str]]:
    out = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                out.append((panel["title"], target["expr"]))
            walk(panel.get("panels", []))

    walk(board["panels"])
    for var in board.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            out.append((f"variable {var['name']}", var["definition"]))
    return out


PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "rate", "irate", "increase", "delta", "histogram_quantile", "topk", "bottomk",
    "absent", "by", "without", "and", "or", "unless", "on", "ignoring", "group_left", "group_right", "offset",
    "label_values", "le", "bool", "time", "vector", "scalar", "clamp_min", "clamp_max", "abs", "quantile",
}


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression reads: adaptgate_* and the few others (e.g. `up`)."""
    cleaned = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values
    cleaned = re.sub(r"\{[^}]*\}", "{}", cleaned)  # matchers
    cleaned = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", cleaned)  # grouping labels
    names = set(re.findall(r"(?<![\w:$.])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?=\{|\[)", cleaned))
    names |= {m for m in re.findall(r"(?<![\w:$.])(adaptgate_[a-zA-Z0-9_]+)", cleaned)}
    return {n for n in names if n not in PROMQL_WORDS}


def selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(metric, [(label, op, value)]) for every `metric{...}` in an expression."""
    out = []
    for metric, body in re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}", expr):
        matchers = re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"', body)
        out.append((metric, matchers))
    return out


@dataclass
class Exported:
    """What a Metrics registry exports: sample names and each family's label names."""

    samples: set[str]
    labels: dict[str, set[str]]  # sample name -> label names (le included for buckets)
    families: set[str]


@cache
def exported_offline() -> Exported:
    """A fresh adaptgate Metrics registry (every family the server registers, with the jobs collector)."""
    from prometheus_client import generate_latest

    from adaptgate.engine.lora.merged import MergeStats
    from adaptgate.metrics import Metrics

    metrics = Metrics()
    metrics.track_jobs(lambda: {"FAILED": 0})
    metrics.track_queue(lambda: 0)
    metrics.track_merges(MergeStats)
    return parse_exposition(generate_latest(metrics.registry).decode(), metrics)


def parse_exposition(text: str, metrics: Any = None) -> Exported:
    """Sample names from the text format, with TYPE lines expanded: a counter family exports
    <name>_total, a histogram <name>_bucket/_sum/_count, even before its first observation."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: set[str] = set()
    labels: dict[str, set[str]] = {}
    families: set[str] = set()
    for family in text_string_to_metric_families(text):
        if not family.name.endswith("_created"):  # client_python's creation timestamps, not metrics to chart
            families.add(family.name)
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "summary": ["_sum", "_count"]}
        for suffix in suffixes.get(family.type, [""]):
            samples.add(family.name + suffix)
        for sample in family.samples:
            samples.add(sample.name)
            labels.setdefault(sample.name, set()).update(sample.labels)
    if metrics is not None:  # label names of labelled families that have no child yet
        for collector in list(metrics.registry._collector_to_names):  # noqa: SLF001 - test introspection
            names = getattr(collector, "_labelnames", None)
            if names is None:
                continue
            for sample_name in metrics.registry._collector_to_names[collector]:  # noqa: SLF001
                labels.setdefault(sample_name, set()).update(names)
                if sample_name.endswith("_bucket"):
                    labels[sample_name].add("le")
    return Exported(samples, labels, families)


def known_label_values() -> dict[str, set[str]]:
    from adaptgate.training.jobs.records import JobState
    from adaptgate.v1 import adapters_pb2, classifier_pb2, datasets_pb2, embeddings_pb2, finetune_pb2

    methods = {
        m.name
        for module in (adapters_pb2, classifier_pb2, datasets_pb2, embeddings_pb2, finetune_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for m in service.methods
    }
    sources = "\n".join(p.read_text() for p in (REPO / "services" / "adaptgate").rglob("*.py"))
    events = set(re.findall(r"adapter_cache\.labels\(\"(\w+)\"\)", sources))
    assert {"hit", "miss", "eviction"} <= events
    return {
        "code": {c.name for c in grpc.StatusCode},
        "method": methods,
        "state": {s.value for s in JobState},
        "event": events,
    }


def check_exprs(exprs: list[tuple[str, str]], samples: set[str], labels: dict[str, set[str]]) -> list[str]:
    problems = []
    known = known_label_values()
    for where, expr in exprs:
        for name in metric_names(expr):
            if name not in samples and name not in PROMETHEUS_SERIES:
                problems.append(f"{where}: {name} is not exported by the server")
        for metric, matchers in selectors(expr):
            if metric in PROMETHEUS_SERIES or metric not in labels:
                continue
            for label, op, value in matchers:
                if label not in labels[metric] | TARGET_LABELS:
                    problems.append(f"{where}: {metric} has no label {label!r} (has {sorted(labels[metric])})")
                if label in known and "$" not in value and op in ("=", "=~"):
                    alternatives = value.split("|") if op == "=~" else [value]
                    for alt in alternatives:
                        if alt not in known[label] and not re.search(r"[.*+?\[]", alt):
                            problems.append(f"{where}: {metric}{{{label}={alt!r}}} is never exported")
    return problems
