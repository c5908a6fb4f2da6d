"""Every rendered object validates offline: core kinds with kubernetes-validate (strict: unknown
fields are errors, as with `kubectl apply --validate=strict`), custom resources against the
upstream CRD schemas copied in deploy/crds/ (OpenAPI v3 → JSON Schema)."""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

import jsonschema
import pytest
import yaml

from tests.deploy.manifests import CRDS, NAMESPACE, Objects

# The oldest Kubernetes minor the manifests are meant for (gRPC probes GA in 1.27, HPA v2,
# PDB v1) and the newest that kubernetes-validate knows.
K8S_VERSIONS = ("1.29", "latest")
CLUSTER_SCOPED = {"Namespace"}


def _json_schema(node: Any) -> Any:
    """OpenAPI v3 (Kubernetes structural schema) → JSON Schema: objects with declared properties
    reject unknown fields unless x-kubernetes-preserve-unknown-fields; int-or-string accepts both."""
    if isinstance(node, list):
        return [_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable"):
        out.pop("nullable")
        if "type" in out:
            out["type"] = [out["type"], "null"]
    if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in node:
        out["additionalProperties"] = False
    return out


@cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) → JSON Schema, for every served version of every CRD in deploy/crds/."""
    schemas = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if not version.get("served", True):
                continue
            schema = _json_schema(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
            # metadata is the apiserver's ObjectMeta, not in the CRD: allow it, check the basics.
            schema["properties"]["metadata"] = {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}},
            }
            schema["properties"].setdefault("apiVersion", {"type": "string"})
            schema["properties"].setdefault("kind", {"type": "string"})
            schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


def _core(obj: dict[str, Any]) -> bool:
    return (obj["apiVersion"], obj["kind"]) not in crd_schemas()


def test_crd_copies_are_present() -> None:
    kinds = {kind for _, kind in crd_schemas()}
    assert {"RayCluster", "ServiceMonitor", "PodMonitor", "PrometheusRule"} <= kinds
    assert (CRDS / "SOURCE.md").is_file(), "deploy/crds/SOURCE.md says where the CRD copies come from"


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
def test_core_objects_validate_with_kubernetes_validate(objects: Objects, k8s_version: str) -> None:
    import kubernetes_validate

    version = kubernetes_validate.latest_version() if k8s_version == "latest" else k8s_version
    errors = []
    for obj in filter(_core, objects.items):
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{name}: {'.'.join(map(str, exc.path))}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(f"{name}: {exc.message}")
    assert not errors, f"Kubernetes {version}:\n" + "\n".join(errors)


def test_custom_resources_validate_against_upstream_crds(objects: Objects) -> None:
    custom = [o for o in objects.items if not _core(o)]
    assert {o["kind"] for o in custom} >= {"RayCluster", "ServiceMonitor", "PodMonitor", "PrometheusRule"}
    errors = []
    for obj in custom:
        schema = crd_schemas()[(obj["apiVersion"], obj["kind"])]
        validator = jsonschema.Draft202012Validator(schema)
        for error in sorted(validator.iter_errors(obj), key=lambda e: list(e.path)):
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {'.'.join(map(str, error.path))}: {error.message}")
    assert not errors, "\n".join(errors)


def test_crd_validation_catches_mistakes(objects: Objects) -> None:
    """The converted schemas are not vacuous: a misspelt field and a wrong type are caught."""
    ray = copy.deepcopy(objects.of("RayCluster")[0])
    schema = crd_schemas()[(ray["apiVersion"], "RayCluster")]
    ray["spec"]["workerGroupSpecs"][0]["minReplica"] = 1
    ray["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(ray))
    assert any("minReplica" in e.message for e in errors), errors
    assert any("is not of type 'string'" in e.message for e in errors), errors


def test_every_object_is_namespaced_in_adaptgate(objects: Objects) -> None:
    for obj in objects.items:
        if obj["kind"] in CLUSTER_SCOPED:
            continue
        assert obj["metadata"].get("namespace") == NAMESPACE, f"{obj['kind']}/{obj['metadata']['name']}"
    assert [n["metadata"]["name"] for n in objects.of("Namespace")] == [NAMESPACE]
