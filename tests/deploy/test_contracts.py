"""The contracts between the rendered objects, and between them and the server's Settings:
ports, probes, the tokens Secret, the volumes, RAY_ADDRESS, selectors, images."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from tests.deploy.manifests import (
    DASHBOARD,
    DEPLOY,
    OVERLAY_TRAITS,
    OVERLAYS,
    SETTINGS_ENV,
    Objects,
    SettingsEnv,
    all_pod_specs,
    containers,
    effective_env,
    env_var,
    match_labels,
    pod_labels,
    port_number,
    selects,
    settings_env_commented,
)

INFERENCE, CONTROL = "adaptgate", "adaptgate-control"
CONFIG, TOKENS = "adaptgate-config", "adaptgate-tokens"


def gateway(objects: Objects, name: str) -> dict[str, Any]:
    return objects.one("Deployment", name)


def gateway_container(objects: Objects, name: str) -> dict[str, Any]:
    pod = gateway(objects, name)["spec"]["template"]["spec"]
    found = [c for c in pod["containers"] if c["name"] == "adaptgate"]
    assert len(found) == 1
    return found[0]


def server_settings(objects: Objects, name: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The Settings the server would build from this container's environment."""
    import os

    from adaptgate.settings import Settings as S

    for var in list(os.environ):
        if var.startswith("ADAPTGATE_") or var == "RAY_ADDRESS":
            monkeypatch.delenv(var)
    for var, value in effective_env(gateway_container(objects, name), objects).items():
        monkeypatch.setenv(var, value)
    return S()


def volume_for(pod: dict[str, Any], container: dict[str, Any], path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (volumeMount, volume) that holds `path` in the container: the deepest mount above it."""
    mounts = [m for m in container.get("volumeMounts", []) if PurePosixPath(path).is_relative_to(m["mountPath"])]
    assert mounts, f"nothing is mounted at or above {path} in {container['name']}"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    return mount, volume


GATEWAYS = (INFERENCE, CONTROL)
README = DEPLOY / "README.md"


def traits(overlay: str) -> frozenset[str]:
    assert overlay in OVERLAY_TRAITS, f"overlays/{overlay} is not listed in tests/deploy/manifests.py OVERLAY_TRAITS"
    return OVERLAY_TRAITS[overlay]


def test_every_overlay_is_declared_and_ha_exists_for_cpu_and_gpu() -> None:
    assert set(OVERLAYS) == set(OVERLAY_TRAITS), f"overlays {OVERLAYS} != declared {sorted(OVERLAY_TRAITS)}"
    assert {frozenset({"ha"}), frozenset({"gpu", "ha"})} <= {OVERLAY_TRAITS[o] for o in OVERLAYS}


# ------------------------------------------------------------------ settings <-> ConfigMap / env

def test_configmap_keys_are_real_settings(objects: Objects) -> None:
    known = SettingsEnv.load().env_names
    data = objects.named_prefix("ConfigMap", CONFIG)["data"]
    unknown = sorted(set(data) - set(known))
    assert not unknown, f"{unknown} in the ConfigMap are not fields of adaptgate.settings.Settings"


def test_gateway_env_names_are_real_settings(objects: Objects) -> None:
    known = SettingsEnv.load().env_names
    for name in GATEWAYS:
        for var in gateway_container(objects, name).get("env", []):
            if var["name"].startswith("ADAPTGATE_") or var["name"].startswith("RAY_"):
                assert var["name"] in known, f"{name}: {var['name']} is not a Settings field"


def test_every_setting_is_wired(objects: Objects) -> None:
    """Each Settings field is set in the ConfigMap or by both Deployments, or documented in
    settings.env as a commented optional line (only for fields with no default)."""
    from adaptgate.settings import Settings as S

    env_names = SettingsEnv.load().env_names
    data = objects.named_prefix("ConfigMap", CONFIG)["data"]
    per_pod = [{v["name"] for v in gateway_container(objects, n).get("env", [])} for n in GATEWAYS]
    commented = settings_env_commented()
    missing = []
    for field_name, info in S.model_fields.items():
        names = {env for env, f in env_names.items() if f == field_name}
        if names & set(data) or all(names & pod for pod in per_pod):
            continue
        if names & set(commented):
            assert info.default is None, f"{field_name} has a default; set it in settings.env, not as a comment"
            continue
        missing.append(f"{field_name} ({' or '.join(sorted(names))})")
    assert not missing, f"settings not wired in deploy/kustomize/base/settings.env or the Deployments: {missing}"


def test_settings_env_documents_each_key() -> None:
    """settings.env is the settings table of the deploy: every key has a comment section above."""
    text = SETTINGS_ENV.read_text()
    assert text.startswith("#")
    keys = re.findall(r"^((?:ADAPTGATE|RAY)_[A-Z0-9_]+)=", text, flags=re.M)
    assert len(keys) == len(set(keys)), "a key appears twice in settings.env"
    # A section is a run of lines between blank lines: each one that sets a key explains it.
    bare = [
        re.findall(r"^([A-Z0-9_]+)=", block, flags=re.M)
        for block in re.split(r"\n\s*\n", text)
        if re.search(r"^[A-Z]", block, flags=re.M) and not re.search(r"^#", block, flags=re.M)
    ]
    assert not bare, f"keys without a comment section in settings.env: {bare}"


def test_settings_env_names_every_setting() -> None:
    """Every Settings field is named in settings.env: a key, a commented optional line, or (for the
    few the Deployments set per pod) the header that lists them."""
    from adaptgate.settings import Settings as S

    text = SETTINGS_ENV.read_text()
    env_names = SettingsEnv.load().env_names
    missing = [
        field_name
        for field_name in S.model_fields
        if not any(re.search(rf"\b{env}\b", text) for env, f in env_names.items() if f == field_name)
    ]
    assert not missing, f"settings.env does not name {missing}"


@pytest.mark.parametrize("name", GATEWAYS)
def test_gateway_environment_parses_and_keeps_the_default_ports(
    objects: Objects, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adaptgate.settings import Settings as S

    settings = server_settings(objects, name, monkeypatch)
    defaults = S.model_construct()
    # Clients, probes and docs assume the server's default ports.
    assert (settings.port, settings.metrics_port) == (defaults.port, defaults.metrics_port) == (50051, 9464)
    assert settings.host in ("0.0.0.0", "[::]"), "the pod must listen on all interfaces for probes and Services"
    assert settings.tokens_file is not None, "never the dev-token fallback in a cluster"
    assert settings.tls_cert_file is None, "native gRPC probes speak plaintext (see deploy/README.md, TLS)"


# ------------------------------------------------------------------ ports and probes

@pytest.mark.parametrize("name", GATEWAYS)
def test_container_ports_and_grpc_probes_match_settings(objects: Objects, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from adaptgate.v1 import adapters_pb2, classifier_pb2, datasets_pb2, embeddings_pb2, finetune_pb2

    settings = server_settings(objects, name, monkeypatch)
    container = gateway_container(objects, name)
    assert port_number(container, "grpc") == settings.port
    assert port_number(container, "metrics") == settings.metrics_port
    # The health service names the server registers: "" (the whole server) and each API service.
    served = {""} | {
        service.full_name
        for module in (adapters_pb2, classifier_pb2, datasets_pb2, embeddings_pb2, finetune_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
    }
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(kind)
        assert probe is not None, f"{name}: no {kind}"
        assert "grpc" in probe, f"{name}: {kind} must be Kubernetes' native gRPC probe (grpc.health.v1)"
        assert probe["grpc"]["port"] == settings.port, f"{name}: {kind} probes port {probe['grpc']['port']}"
        assert probe["grpc"].get("service", "") in served, f"{name}: {kind} asks for an unknown health service"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "model load + Ray start need minutes"


@pytest.mark.parametrize("name", GATEWAYS)
def test_termination_grace_covers_prestop_and_drain(objects: Objects, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = server_settings(objects, name, monkeypatch)
    pod = gateway(objects, name)["spec"]["template"]["spec"]
    container = gateway_container(objects, name)
    pre_stop = container["lifecycle"]["preStop"]
    sleep = int(pre_stop["sleep"]["seconds"]) if "sleep" in pre_stop else int(pre_stop["exec"]["command"][-1])
    grace = pod["terminationGracePeriodSeconds"]
    # SIGTERM comes after preStop; then the server drains for drain_seconds and stops the engine and Ray.
    assert grace >= sleep + settings.drain_seconds + 10, f"{name}: grace {grace}s < preStop {sleep}s + drain {settings.drain_seconds}s + 10s"
    assert grace <= sleep + settings.drain_seconds + 60, f"{name}: a grace period far beyond the drain only delays rollouts"


@pytest.mark.parametrize("name", GATEWAYS)
def test_torch_threads_fit_the_cpu_request(objects: Objects, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = server_settings(objects, name, monkeypatch)
    requests = gateway_container(objects, name)["resources"]["requests"]
    cpu = str(requests["cpu"])
    cpus = float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    assert 1 <= settings.torch_threads <= max(1, cpus), "torch's default uses every core of the node"
    assert "memory" in requests and "memory" in gateway_container(objects, name)["resources"]["limits"]


# ------------------------------------------------------------------ tokens, data, adapters

@pytest.mark.parametrize("name", GATEWAYS)
def test_tokens_secret_is_mounted_where_tokens_file_points(objects: Objects, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = server_settings(objects, name, monkeypatch)
    path = str(settings.tokens_file)
    pod = gateway(objects, name)["spec"]["template"]["spec"]
    mount, volume = volume_for(pod, gateway_container(objects, name), path)
    assert mount.get("readOnly") is True
    assert "secret" in volume, f"{path} must come from a Secret, not {sorted(volume)}"
    secret = objects.one("Secret", volume["secret"]["secretName"])
    assert secret["metadata"]["name"].startswith(TOKENS)
    relative = str(PurePosixPath(path).relative_to(mount["mountPath"]))
    items = {i["path"]: i["key"] for i in volume["secret"].get("items", [])} or {k: k for k in secret["data"]}
    assert relative in items, f"the Secret volume does not project a file at {relative}"
    body = json.loads(base64.b64decode(secret["data"][items[relative]]))
    assert isinstance(body.get("tokens"), dict), "the tokens file is {\"tokens\": {...}}"


def test_shipped_tokens_file_holds_no_token() -> None:
    """The base Secret fails closed: the server refuses to start on it until an operator replaces it."""
    assert json.loads((DEPLOY / "kustomize" / "base" / "tokens.json").read_text()) == {"tokens": {}}


def test_data_and_adapter_volumes(objects: Objects, overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    claims = {c["metadata"]["name"]: c for c in objects.of("PersistentVolumeClaim")}
    layout: dict[str, dict[str, Any]] = {}
    for name in GATEWAYS:
        settings = server_settings(objects, name, monkeypatch)
        pod = gateway(objects, name)["spec"]["template"]["spec"]
        container = gateway_container(objects, name)
        data_mount, data_volume = volume_for(pod, container, str(settings.data_dir))
        db_mount, db_volume = volume_for(pod, container, str(settings.database_path))
        ad_mount, ad_volume = volume_for(pod, container, str(settings.adapters_dir))
        assert data_volume is db_volume
        layout[name] = {"data": data_volume, "adapters": (ad_mount, ad_volume)}

    control_data = layout[CONTROL]["data"]
    if "ha" in traits(overlay):
        # The job database is PostgreSQL: nothing durable lives in the data dir, only the upload spool.
        assert "emptyDir" in control_data, "with PostgreSQL the control data dir is scratch (two replicas share no RWO claim)"
        spool = server_settings(objects, CONTROL, monkeypatch).max_upload_bytes_in_flight
        assert quantity_bytes(control_data["emptyDir"]["sizeLimit"]) >= spool, (
            "the upload spool (data_dir/uploads) holds up to ADAPTGATE_MAX_UPLOAD_BYTES_IN_FLIGHT"
        )
    else:
        # Control: the SQLite job database on its own ReadWriteOnce claim.
        assert "persistentVolumeClaim" in control_data, "the job database must survive pod restarts"
        db_claim = claims[control_data["persistentVolumeClaim"]["claimName"]]
        assert db_claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    # The adapter store read-write on control.
    mount, volume = layout[CONTROL]["adapters"]
    assert not mount.get("readOnly")
    store_claim = volume["persistentVolumeClaim"]["claimName"]
    assert "ReadWriteMany" in claims[store_claim]["spec"]["accessModes"]

    # Inference: its own scratch database, the same adapter store read-only.
    assert "emptyDir" in layout[INFERENCE]["data"], "inference replicas must not share the SQLite file"
    mount, volume = layout[INFERENCE]["adapters"]
    assert mount.get("readOnly") is True and volume["persistentVolumeClaim"]["claimName"] == store_claim


def test_inference_scales_and_drains_one_replica_at_a_time(objects: Objects) -> None:
    inference = gateway(objects, INFERENCE)
    assert "replicas" not in inference["spec"], "the HPA owns replicas; a replicas field resets it on every apply"
    hpas = objects.of("HorizontalPodAutoscaler")
    assert len(hpas) == 1
    hpa = hpas[0]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": INFERENCE}
    assert 1 <= hpa["minReplicas"] < hpa["maxReplicas"]
    container = gateway_container(objects, INFERENCE)
    for metric in hpa["metrics"]:
        if metric["type"] == "Resource":
            assert metric["resource"]["name"] in container["resources"]["requests"], "utilization needs a request"
    pdb = objects.one("PodDisruptionBudget", INFERENCE)["spec"]
    assert selects(match_labels(pdb["selector"]), pod_labels(inference))
    assert not selects(match_labels(pdb["selector"]), pod_labels(gateway(objects, CONTROL)))
    # Never a budget that blocks node drains: some replica may always be evicted.
    if "minAvailable" in pdb:
        assert pdb["minAvailable"] < hpa["minReplicas"]
    else:
        assert pdb["maxUnavailable"] >= 1


def test_security_context_is_non_root_and_matches_the_image_user(objects: Objects) -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    uid = int(re.findall(r"^USER\s+(\d+)", dockerfile, flags=re.M)[-1].split(":")[0])
    for owner, pod in all_pod_specs(objects):
        context = pod.get("securityContext", {})
        assert context.get("runAsNonRoot") is True, owner
        assert context.get("runAsUser") == uid, f"{owner}: runAsUser {context.get('runAsUser')} != image USER {uid}"
        for container in containers(pod):
            security = container.get("securityContext", {})
            assert security.get("allowPrivilegeEscalation") is False, f"{owner}/{container['name']}"
            assert security.get("capabilities", {}).get("drop") == ["ALL"], f"{owner}/{container['name']}"


# ------------------------------------------------------------------ Services, monitoring, network

def test_services_select_the_gateways_by_named_ports(objects: Objects, monkeypatch: pytest.MonkeyPatch) -> None:
    for service in objects.of("Service"):
        selected = [d for d in objects.deployments() if selects(service["spec"]["selector"], pod_labels(d))]
        assert len(selected) == 1, f"Service {service['metadata']['name']} selects {len(selected)} Deployments"
        name = selected[0]["metadata"]["name"]
        settings = server_settings(objects, name, monkeypatch)
        container = gateway_container(objects, name)
        ports = {p["name"]: p for p in service["spec"]["ports"]}
        assert ports["grpc"]["port"] == settings.port
        assert port_number(container, ports["grpc"]["targetPort"]) == settings.port
        if "metrics" in ports:
            assert port_number(container, ports["metrics"]["targetPort"]) == settings.metrics_port
    assert {s["metadata"]["name"] for s in objects.of("Service")} >= {INFERENCE, CONTROL}


def test_service_monitor_scrapes_each_gateway_once_by_port_name(objects: Objects) -> None:
    monitors = objects.of("ServiceMonitor")
    assert len(monitors) == 1
    spec = monitors[0]["spec"]
    selected = [s for s in objects.of("Service") if selects(match_labels(spec["selector"]), s["metadata"].get("labels", {}))]
    assert {s["metadata"]["name"] for s in selected} == {INFERENCE, CONTROL}, "each gateway pod scraped once"
    for endpoint in spec["endpoints"]:
        for service in selected:
            assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}, (
                f"ServiceMonitor endpoint port {endpoint['port']!r} is not a port name of Service {service['metadata']['name']}"
            )
        assert endpoint.get("path", "/metrics") == "/metrics"
    assert "namespaceSelector" not in spec, "the ServiceMonitor watches its own namespace, where the Services are"


def test_pod_monitor_selects_the_ray_pods_metrics_port(objects: Objects) -> None:
    (ray,) = objects.of("RayCluster")
    (monitor,) = objects.of("PodMonitor")
    assert match_labels(monitor["spec"]["selector"]) == {"ray.io/cluster": ray["metadata"]["name"]}
    for owner, pod in all_pod_specs(objects):
        if owner.startswith("RayCluster/"):
            for endpoint in monitor["spec"]["podMetricsEndpoints"]:
                port_number(pod["containers"][0], endpoint["port"])


def test_prometheus_operator_objects_share_a_release_label(objects: Objects) -> None:
    labels = {o["metadata"]["labels"].get("release") for o in objects.items if o["apiVersion"].startswith("monitoring.coreos.com/")}
    assert labels == {"kube-prometheus-stack"}, "the Prometheus CR selects them by one label (deploy/README.md)"


def test_network_policies_refer_to_real_pods_and_ports(objects: Objects) -> None:
    (ray,) = objects.of("RayCluster")
    ray_labels = {"ray.io/cluster": ray["metadata"]["name"]}
    pods = [(o, pod_labels(d), d["spec"]["template"]["spec"]) for o, d in ((d["metadata"]["name"], d) for d in objects.deployments())]
    for policy in objects.of("NetworkPolicy"):
        selector = match_labels(policy["spec"]["podSelector"])
        targets = [p for p in pods if selects(selector, p[1])]
        if selector == ray_labels:
            continue  # KubeRay labels its pods ray.io/cluster=<name>
        assert targets, f"NetworkPolicy {policy['metadata']['name']} selects no pod"
        for rule in policy["spec"].get("ingress", []):
            for port in rule.get("ports", []):
                for _, _, pod in targets:
                    port_number(pod["containers"][0], port["port"])
            for peer in rule.get("from", []):
                peer_labels = match_labels(peer.get("podSelector", {}))
                if "ray.io/cluster" in peer_labels:
                    assert peer_labels == ray_labels
    # Ray traffic between the control replica (a Ray node) and the RayCluster is allowed both ways.
    control = pod_labels(gateway(objects, CONTROL))
    ray_policy = [p for p in objects.of("NetworkPolicy") if match_labels(p["spec"]["podSelector"]) == ray_labels]
    assert ray_policy and any(
        selects(match_labels(peer.get("podSelector", {})), control) and not rule.get("ports")
        for rule in ray_policy[0]["spec"]["ingress"] for peer in rule.get("from", [])
    )


# ------------------------------------------------------------------ Ray

def test_ray_address_points_at_the_rayclusters_head_service(objects: Objects, monkeypatch: pytest.MonkeyPatch) -> None:
    (ray,) = objects.of("RayCluster")
    head = ray["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    gcs_port = port_number(head, "gcs-server")
    settings = server_settings(objects, CONTROL, monkeypatch)
    assert settings.ray_address == f"{ray['metadata']['name']}-head-svc:{gcs_port}", (
        "KubeRay names the head Service <RayCluster name>-head-svc; the driver joins on the GCS port"
    )
    assert ray["spec"]["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    inference = server_settings(objects, INFERENCE, monkeypatch)
    assert not inference.ray_address, "inference replicas keep a local Ray and never drive the RayCluster"


def test_ray_version_matches_the_image(objects: Objects) -> None:
    (ray,) = objects.of("RayCluster")
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    (version,) = re.findall(r"^ARG RAY_VERSION=(\S+)", dockerfile, flags=re.M)
    assert ray["spec"]["rayVersion"] == version


def test_ray_groups_and_gpus(objects: Objects, overlay: str) -> None:
    (ray,) = objects.of("RayCluster")
    head_params = ray["spec"]["headGroupSpec"]["rayStartParams"]
    assert head_params.get("num-cpus") == "0", "the head schedules; jobs run on workers"
    groups = {g["groupName"]: g for g in ray["spec"]["workerGroupSpecs"]}
    assert "cpu" in groups and groups["cpu"]["minReplicas"] >= 1
    for group in groups.values():
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]

    def gpus(container: dict[str, Any]) -> int:
        return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))

    if "gpu" in traits(overlay):
        assert "gpu" in groups and gpus(groups["gpu"]["template"]["spec"]["containers"][0]) >= 1
        assert gpus(gateway_container(objects, INFERENCE)) == 1
    else:
        assert all(gpus(c) == 0 for _, pod in all_pod_specs(objects) for c in containers(pod))


def test_images_are_one_release_and_cuda_where_gpus_are(objects: Objects, overlay: str) -> None:
    images = {}
    for owner, pod in all_pod_specs(objects):
        for container in containers(pod):
            images[f"{owner}/{container['name']}"] = (container["image"], container)
    repos, versions = set(), set()
    for where, (image, container) in images.items():
        match = re.fullmatch(r"(?P<repo>[^@]+):(?P<version>[0-9][^-]*)-(?P<flavor>cpu|cuda)", image)
        assert match, f"{where}: image {image!r} is not <repo>:<version>-cpu|cuda (never :latest)"
        repos.add(match["repo"])
        versions.add(match["version"])
        wants_gpu = int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) > 0
        assert (match["flavor"] == "cuda") == wants_gpu, f"{where}: {image} with GPUs={wants_gpu}"
    assert len(repos) == 1 and len(versions) == 1, f"one image release per overlay, got {sorted(images)}"
    if "gpu" not in traits(overlay):
        assert all(image.endswith("-cpu") for image, _ in images.values())


# ------------------------------------------------------------------ dashboard

def test_grafana_dashboard_configmap_is_the_json_file(objects: Objects) -> None:
    board = objects.one("ConfigMap", "adaptgate-grafana-dashboard")
    assert board["metadata"]["labels"].get("grafana_dashboard") == "1"
    assert json.loads(board["data"]["adaptgate.json"]) == json.loads(Path(DASHBOARD).read_text())


# ------------------------------------------------------------------ the operator's own overlay

def test_an_operators_overlay_replaces_the_tokens_and_the_registry(tmp_path: Path, overlay: str, objects: Objects) -> None:
    """deploy/README.md step 2, as written: a kustomization outside the repo that uses an overlay,
    replaces the token Secret, points the images at a registry and makes the shared claims
    ReadWriteOnce for a single-node cluster."""
    import os
    import subprocess

    import yaml

    from tests.deploy.manifests import KUSTOMIZE, kubectl

    tokens = {"tokens": {"s3cr3t": {"tenant": "acme", "admin": False}, "4dm1n": {"tenant": "ops", "admin": True}}}
    (tmp_path / "tokens.json").write_text(json.dumps(tokens))
    base = os.path.relpath(KUSTOMIZE / "overlays" / overlay, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(f"""apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - {base}
secretGenerator:
  - name: adaptgate-tokens
    namespace: adaptgate
    behavior: replace
    files:
      - tokens.json
images:
  - name: adaptgate
    newName: registry.example.com/team/adaptgate
patches:
  - target:
      kind: PersistentVolumeClaim
      name: adaptgate-adapters|adaptgate-storage
    patch: |
      - op: replace
        path: /spec/accessModes
        value: [ReadWriteOnce]
""")
    out = subprocess.run([kubectl(), "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    mine = Objects(tuple(d for d in yaml.safe_load_all(out.stdout) if d))
    (secret,) = mine.of("Secret")
    assert json.loads(base64.b64decode(secret["data"]["tokens.json"])) == tokens
    for name in GATEWAYS:
        volumes = gateway(mine, name)["spec"]["template"]["spec"]["volumes"]
        assert any(v.get("secret", {}).get("secretName") == secret["metadata"]["name"] for v in volumes), (
            f"{name} must mount the replaced Secret (its new hashed name rolls the pods)"
        )
    images = {c["image"] for _, pod in all_pod_specs(mine) for c in containers(pod)}
    assert all(i.startswith("registry.example.com/team/adaptgate:0.1.0-") for i in images), images
    # The single-node patch reaches both shared claims.
    for claim in ("adaptgate-adapters", "adaptgate-storage"):
        assert mine.one("PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteOnce"]


# ------------------------------------------------------------------ replica roles

def test_each_gateway_declares_its_role_and_inference_names_the_control_service(
    objects: Objects, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inference replicas answer writes and job calls with FAILED_PRECONDITION naming control_address:
    it must be the control Service, on its gRPC port, and that Service must reach a control replica."""
    inference = server_settings(objects, INFERENCE, monkeypatch)
    control = server_settings(objects, CONTROL, monkeypatch)
    assert inference.role == "inference", "the scaled replicas mount the adapter store read-only and keep no job database"
    assert control.role == "control"
    host, _, port = inference.control_address.rpartition(":")
    service_name, *domain = host.split(".")
    service = objects.one("Service", service_name)
    assert not domain or domain[0] == service["metadata"]["namespace"], f"{host} is not in the Service's namespace"
    assert int(port) == next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    selected = [d for d in objects.deployments() if selects(service["spec"]["selector"], pod_labels(d))]
    assert [d["metadata"]["name"] for d in selected] == [CONTROL]


# ------------------------------------------------------------------ what reaches code execution

def test_ray_dashboard_listens_on_loopback_only(objects: Objects) -> None:
    """The dashboard serves Ray's Jobs API (run any command on the cluster): nothing outside the head
    pod may reach it. KubeRay's probes and the autoscaler sidecar call it inside the pod."""
    (ray,) = objects.of("RayCluster")
    params = ray["spec"]["headGroupSpec"]["rayStartParams"]
    assert params.get("include-dashboard") == "false" or params.get("dashboard-host") in ("127.0.0.1", "localhost"), (
        f"dashboard-host {params.get('dashboard-host')!r} exposes the Jobs API to every pod that reaches the head"
    )


def metrics_ports(objects: Objects, policy: dict[str, Any]) -> set[int | str]:
    """The ports a policy's pods export metrics on: the containers' `metrics` port, by name and number."""
    selector = match_labels(policy["spec"]["podSelector"])
    pods = [pod for owner, pod in all_pod_specs(objects) if selects(selector, pod_labels_of(objects, owner))]
    found: set[int | str] = set()
    for pod in pods:
        for container in pod["containers"]:
            for port in container.get("ports", []):
                if port.get("name") == "metrics":
                    found |= {"metrics", port["containerPort"]}
    return found


def pod_labels_of(objects: Objects, owner: str) -> dict[str, str]:
    """The labels a pod gets: its template's, plus ray.io/cluster for the pods KubeRay makes."""
    kind, name, *group = owner.split("/")
    if kind == "Deployment":
        return pod_labels(objects.one("Deployment", name))
    ray = objects.one("RayCluster", name)
    spec = ray["spec"]["headGroupSpec"] if group == ["head"] else next(
        g for g in ray["spec"]["workerGroupSpecs"] if g["groupName"] == group[0]
    )
    return {**spec["template"]["metadata"].get("labels", {}), "ray.io/cluster": name}


def test_peers_from_other_namespaces_name_their_namespace_and_reach_only_metrics(objects: Objects) -> None:
    """A label is no identity: anyone who may create a pod in any namespace can label it like the
    KubeRay operator or Prometheus. Peers outside adaptgate's namespace are therefore pinned to one
    namespace by name, and they reach metrics ports only, never gRPC, Ray or the dashboard."""
    problems = []
    for policy in objects.of("NetworkPolicy"):
        name = policy["metadata"]["name"]
        allowed = metrics_ports(objects, policy)
        assert allowed, f"NetworkPolicy {name} selects no pod with a metrics port"
        for rule in policy["spec"].get("ingress", []):
            foreign = [peer for peer in rule.get("from", []) if "namespaceSelector" in peer]
            for peer in foreign:
                namespace = match_labels(peer["namespaceSelector"]).get("kubernetes.io/metadata.name")
                if not namespace:
                    problems.append(f"{name}: a peer from any namespace ({peer})")
                if not peer.get("podSelector"):
                    problems.append(f"{name}: every pod of namespace {namespace} ({peer})")
            ports = [p["port"] for p in rule.get("ports", [])]
            if foreign and (not ports or any(p not in allowed for p in ports)):
                problems.append(f"{name}: pods of another namespace reach ports {ports or 'all'} (metrics only: {sorted(map(str, allowed))})")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------ shared storage: datasets and checkpoints

DATABASE_URL, REPLICA_ID, STORAGE_URI = "ADAPTGATE_DATABASE_URL", "ADAPTGATE_REPLICA_ID", "ADAPTGATE_STORAGE_URI"
SINGLE_NODE_MODES = {"ReadWriteOnce", "ReadWriteOncePod"}


def quantity_bytes(quantity: str | int) -> float:
    """A Kubernetes quantity (512Mi, 2Gi, 1G, 1000) in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i|[kMGT])?", str(quantity))
    assert match, f"unreadable quantity {quantity!r}"
    return float(match[1]) * units.get(match[2] or "", 1)


def storage_path(uri: str) -> str | None:
    """The directory a storage URI names on the pod (a path or file:///path); None for an object
    store (s3://, gs://: nothing to mount) or when unset."""
    if uri.startswith("file://"):
        return uri.removeprefix("file://")
    return uri if uri.startswith("/") else None


def claim_of(objects: Objects, volume: dict[str, Any]) -> dict[str, Any] | None:
    pvc = volume.get("persistentVolumeClaim")
    return objects.one("PersistentVolumeClaim", pvc["claimName"]) if pvc else None


def ray_task_pods(objects: Objects) -> list[tuple[str, dict[str, Any]]]:
    """The Ray pods that run training tasks: every worker group, and the head if it offers resources."""
    (ray,) = objects.of("RayCluster")
    pods = [(f"worker group {g['groupName']}", g["template"]["spec"]) for g in ray["spec"]["workerGroupSpecs"]]
    head = ray["spec"]["headGroupSpec"]
    head_gpus = any(
        int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) for c in head["template"]["spec"]["containers"]
    )
    if head["rayStartParams"].get("num-cpus") != "0" or head_gpus:
        pods.append(("head", head["template"]["spec"]))
    return pods


def test_every_storage_path_is_a_mounted_read_write_many_claim(objects: Objects, monkeypatch: pytest.MonkeyPatch) -> None:
    """Datasets and checkpoints live under ADAPTGATE_STORAGE_URI: wherever a container sets it to a
    path, a writable ReadWriteMany claim is mounted at that path (another pod, on another node, reads
    what this one wrote)."""
    control = storage_path(server_settings(objects, CONTROL, monkeypatch).storage_uri)
    assert control, "control keeps datasets and checkpoints where Ray workers can read them, not in its own data dir"
    problems = []
    for owner, pod in all_pod_specs(objects):
        for container in containers(pod):
            path = storage_path(effective_env(container, objects).get(STORAGE_URI, ""))
            if path is None:
                continue
            mount, volume = volume_for(pod, container, path)
            claim = claim_of(objects, volume)
            where = f"{owner}/{container['name']}: {STORAGE_URI}={path}"
            if mount["mountPath"] != path:
                problems.append(f"{where} lies inside the mount at {mount['mountPath']}, not a volume of its own")
            if claim is None or "ReadWriteMany" not in claim["spec"]["accessModes"]:
                problems.append(f"{where} is not a ReadWriteMany claim ({sorted(volume)})")
            if mount.get("readOnly"):
                problems.append(f"{where} is mounted read-only")
    assert not problems, "\n".join(problems)


def test_every_ray_worker_group_mounts_the_control_storage_claim_at_the_same_path(
    objects: Objects, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Control sends workers the storage path of a job's dataset and checkpoints: a task retried on
    another worker pod (of any group) finds the checkpoint only if that pod mounts the same claim
    at the same path."""
    path = storage_path(server_settings(objects, CONTROL, monkeypatch).storage_uri)
    assert path
    control_pod = gateway(objects, CONTROL)["spec"]["template"]["spec"]
    control_mount, control_volume = volume_for(control_pod, gateway_container(objects, CONTROL), path)
    claim = claim_of(objects, control_volume)
    assert claim is not None and "ReadWriteMany" in claim["spec"]["accessModes"]
    task_pods = ray_task_pods(objects)
    assert task_pods
    for owner, pod in task_pods:
        for container in pod["containers"]:
            mount, volume = volume_for(pod, container, path)
            where = f"Ray {owner}/{container['name']}"
            assert mount["mountPath"] == control_mount["mountPath"], f"{where} mounts {path} at {mount['mountPath']}"
            assert volume.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"], (
                f"{where}: {path} is {sorted(volume)}, not the claim {claim['metadata']['name']} control writes"
            )
            assert not mount.get("readOnly"), f"{where}: checkpoints are written there"


# ------------------------------------------------------------------ one control replica (SQLite) or several (PostgreSQL)

def pods_selected(objects: Objects, selector: dict[str, str]) -> list[str]:
    """Every pod template (Deployments, Ray groups) a matchLabels selector picks."""
    return [owner for owner, _ in all_pod_specs(objects) if selects(selector, pod_labels_of(objects, owner))]


def test_control_replicas_rollout_and_disruption_budget(objects: Objects, overlay: str) -> None:
    deployment = gateway(objects, CONTROL)
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    control_pdbs = [p for p in objects.of("PodDisruptionBudget") if selects(match_labels(p["spec"]["selector"]), pod_labels(deployment))]
    if "ha" not in traits(overlay):
        assert spec["replicas"] == 1, "one writer of the SQLite job database"
        assert spec["strategy"]["type"] == "Recreate", "a rolling update would run two writers at once"
        assert not control_pdbs, "a PDB on the single control replica blocks every node drain"
        return
    replicas = spec["replicas"]
    assert replicas >= 2, "a second control replica takes a dead one's jobs over"
    assert spec["strategy"]["type"] == "RollingUpdate"
    rolling = spec["strategy"].get("rollingUpdate", {})
    assert rolling.get("maxUnavailable") in (0, 1) and rolling.get("maxUnavailable") < replicas, (
        "a rollout keeps a control replica serving"
    )
    (pdb,) = control_pdbs
    assert pods_selected(objects, match_labels(pdb["spec"]["selector"])) == [f"Deployment/{CONTROL}"], (
        "the control PDB selects the control pods and nothing else"
    )
    assert pdb["spec"].get("minAvailable") == 1 and "maxUnavailable" not in pdb["spec"]
    assert pdb["spec"]["minAvailable"] < replicas, "a drain must still be able to evict one control replica"
    preferred = pod.get("affinity", {}).get("podAntiAffinity", {}).get("preferredDuringSchedulingIgnoredDuringExecution", [])
    assert any(
        term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
        and selects(match_labels(term["podAffinityTerm"]["labelSelector"]), pod_labels(deployment))
        for term in preferred
    ), "control replicas prefer different nodes, so one node's loss leaves one serving"
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in pod.get("affinity", {}).get("podAntiAffinity", {}), (
        "preferred, not required: a one-node cluster must still run both"
    )
    for volume in pod["volumes"]:
        claim = claim_of(objects, volume)
        if claim is not None:
            modes = set(claim["spec"]["accessModes"])
            assert not modes & SINGLE_NODE_MODES, (
                f"control mounts {claim['metadata']['name']} ({sorted(modes)}): two replicas on two nodes cannot share it"
            )


def readme_secrets() -> dict[str, set[str]]:
    """The Secrets deploy/README.md tells operators to create: `kubectl -n <ns> create secret generic
    <name> --from-literal=<key>=… | --from-file=<key>=…`, name -> keys."""
    from tests.deploy.manifests import NAMESPACE

    found: dict[str, set[str]] = {}
    text = README.read_text().replace("\\\n", " ")
    for namespace, name, options in re.findall(r"kubectl -n (\S+) create secret generic ([\w.-]+)((?:\s+--[\w-]+=\S+)+)", text):
        assert namespace == NAMESPACE, f"deploy/README.md creates the Secret {name} in {namespace}"
        found.setdefault(name, set()).update(re.findall(r"--from-(?:literal|file)=([\w.-]+)=", options))
    return found


def test_control_database_and_replica_identity(objects: Objects, overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The database URL holds a password: no manifest carries one. Without ha it is empty (SQLite);
    with ha it comes from a Secret the operator creates, as deploy/README.md says, and each replica
    names itself in job leases by its pod name."""
    for config in objects.of("ConfigMap"):
        assert config.get("data", {}).get(DATABASE_URL, "") == "", f"ConfigMap {config['metadata']['name']} sets {DATABASE_URL}"
    for owner, pod in all_pod_specs(objects):
        for container in containers(pod):
            var = env_var(container, DATABASE_URL)
            assert var is None or "secretKeyRef" in var.get("valueFrom", {}), f"{owner}/{container['name']}: {DATABASE_URL} as a literal"
    container = gateway_container(objects, CONTROL)
    if "ha" not in traits(overlay):
        assert server_settings(objects, CONTROL, monkeypatch).database_url == "", "one control replica on SQLite"
        return
    # env wins over envFrom (the ConfigMap's empty value), so the Secret's URL is what the server reads.
    var = env_var(container, DATABASE_URL)
    assert var is not None, f"ha: control sets {DATABASE_URL} in env, from a Secret"
    ref = var["valueFrom"]["secretKeyRef"]
    assert not ref.get("optional"), "without the Secret the pod must not start (it would fall back to SQLite)"
    assert not [s for s in objects.of("Secret") if s["metadata"]["name"] == ref["name"]], (
        f"the overlay ships a Secret {ref['name']}: the operator creates it with the real password"
    )
    assert readme_secrets().get(ref["name"], set()) >= {ref["key"]}, (
        f"deploy/README.md must tell operators to create Secret {ref['name']} with key {ref['key']} (it says {readme_secrets()})"
    )
    identity = env_var(container, REPLICA_ID)
    assert identity is not None and identity["valueFrom"].get("fieldRef", {}).get("fieldPath") == "metadata.name", (
        f"ha: {REPLICA_ID} is the pod name (unique, and readable in kubectl get pods)"
    )
    # The database is outside the namespace: if a policy restricts control's egress, PostgreSQL stays reachable.
    for policy in objects.of("NetworkPolicy"):
        if "Egress" in policy["spec"].get("policyTypes", []) and selects(match_labels(policy["spec"]["podSelector"]), pod_labels(gateway(objects, CONTROL))):
            assert any(
                not rule.get("ports") or any(p.get("port") == 5432 for p in rule["ports"]) for rule in policy["spec"].get("egress", [])
            ), f"NetworkPolicy {policy['metadata']['name']} cuts control off from PostgreSQL (TCP 5432)"


def local_path(location: Any) -> str | None:
    """A settings location (a Path, or a shared-storage handle) as a path on the pod; None for an object store."""
    fs = getattr(location, "fs", None)
    if fs is None:
        return str(location)
    from fsspec.implementations.local import LocalFileSystem

    return str(location.path) if isinstance(fs, LocalFileSystem) else None


def test_control_keeps_nothing_durable_in_pod_scratch(objects: Objects, overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Datasets, checkpoints and (without PostgreSQL) the SQLite file outlive the pod: each lies on a
    claim. With several control replicas, on one they all share, so any replica reads any dataset."""
    settings = server_settings(objects, CONTROL, monkeypatch)
    pod = gateway(objects, CONTROL)["spec"]["template"]["spec"]
    container = gateway_container(objects, CONTROL)
    durable = {"datasets": settings.datasets_dir, "checkpoints": settings.checkpoints_dir}
    if not settings.database_url:
        durable["the SQLite job database"] = settings.database_path
    problems = []
    for what, location in durable.items():
        path = local_path(location)
        if path is None:
            continue  # an object store: nothing to mount
        _, volume = volume_for(pod, container, path)
        claim = claim_of(objects, volume)
        if claim is None:
            problems.append(f"{what} ({path}) lie on {sorted(set(volume) - {'name'})}, lost with the pod")
        elif "ha" in traits(overlay) and "ReadWriteMany" not in claim["spec"]["accessModes"]:
            problems.append(f"{what} ({path}) lie on {claim['metadata']['name']}, which the other control replicas cannot mount")
    assert not problems, "\n".join(problems)


def test_every_claim_is_mounted(objects: Objects) -> None:
    """A claim no pod mounts only holds a disk (the ha overlays drop control's SQLite volume)."""
    mounted = {
        v["persistentVolumeClaim"]["claimName"] for _, pod in all_pod_specs(objects) for v in pod.get("volumes", []) if "persistentVolumeClaim" in v
    }
    unused = sorted({c["metadata"]["name"] for c in objects.of("PersistentVolumeClaim")} - mounted)
    assert not unused, f"claims no pod mounts: {unused}"
