"""The whole platform over TLS with API keys: Python client, CLI, Node client, HTTP API.

One cluster serves the module: a dataset service that asks every client for a
certificate (mTLS), a trainer, a training worker and a predictor on the tiny model
serving TLS, and the OpenAI-compatible API serving HTTPS, all with API keys on.
Every process calls the others over TLS with its own service key (and the client
certificate the dataset service asks for); the CA and the certificates are made
here with `cryptography`.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from loraforge.client import Client, ClientError
from loraforge.client.demo import demo_file
from loraforge.services.common.auth import new_api_key
from loraforge.services.common.channels import ChannelSecurity
from loraforge.services.common.healthcheck import check
from tests.support import REPO, ServiceProcess, start_service
from tests.tiny_model import build_tiny_model

pytestmark = pytest.mark.slow

TRAINING = {
    "model_config": {"torch_dtype": "float32"},
    "peft_config": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
    "tokenizer_config": {"model_max_length": 128},
    "trainer_config": {
        "num_train_epochs": 1,
        "per_device_train_batch_size": 16,
        "learning_rate": 3e-3,
        "eval_split_percent": 0,
    },
}


# ----- a CA and its certificates ---------------------------------------------------------------


@dataclass(frozen=True)
class Pem:
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(folder: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Pem:
    cert_path, key_path = folder / f"{stem}.crt", folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return Pem(cert_path, key_path)


@dataclass
class CertificateAuthority:
    """A CA that signs server and client certificates, all written as PEM files in `folder`."""

    folder: Path
    label: str = "loraforge test CA"
    key: ec.EllipticCurvePrivateKey = field(init=False)
    cert: x509.Certificate = field(init=False)
    pem: Pem = field(init=False)

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(self.label))
            .issuer_name(_name(self.label))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.pem = _write(self.folder, "ca", self.cert, self.key)

    def issue(self, stem: str, *, server: bool) -> Pem:
        """A certificate for 127.0.0.1 and localhost (server) or a client, signed by this CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name("localhost" if server else stem))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        return _write(self.folder, stem, builder.sign(self.key, hashes.SHA256()), key)


# ----- the cluster -----------------------------------------------------------------------------


@dataclass
class Cluster:
    workdir: Path
    ca: CertificateAuthority
    server: Pem
    client_pem: Pem
    dataset: ServiceProcess
    trainer: ServiceProcess
    predictor: ServiceProcess
    openai: ServiceProcess
    worker: subprocess.Popen[bytes]
    base_model: Path
    admin_key_file: Path

    @property
    def admin_key(self) -> str:
        return self.admin_key_file.read_text().strip()

    @property
    def addresses(self) -> dict[str, str]:
        return {
            "dataset": self.dataset.address,
            "trainer": self.trainer.address,
            "predictor": self.predictor.address,
        }

    def client(self, api_key: str | None = None, **tls: str) -> Client:
        """A client with the CA and the client certificate unless `tls` says otherwise."""
        settings = {
            "tls_ca_file": str(self.ca.pem.cert),
            "tls_cert_file": str(self.client_pem.cert),
            "tls_key_file": str(self.client_pem.key),
            **tls,
        }
        key = self.admin_key if api_key is None else api_key
        return Client(**self.addresses, api_key=key, **settings)

    def tls_env(self) -> dict[str, str]:
        """What a client process needs to reach the cluster: addresses, CA, client certificate."""
        return {
            **{f"LORAFORGE_{k.upper()}_ADDRESS": v for k, v in self.addresses.items()},
            "LORAFORGE_TLS_CA_FILE": str(self.ca.pem.cert),
            "LORAFORGE_TLS_CLIENT_CERT_FILE": str(self.client_pem.cert),
            "LORAFORGE_TLS_CLIENT_KEY_FILE": str(self.client_pem.key),
        }


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("tls")
    ca = CertificateAuthority(workdir / "pki")
    server = ca.issue("server", server=True)
    client = ca.issue("client", server=False)
    base = build_tiny_model(workdir / "models" / "tiny-llama")
    keys = {name: new_api_key()[1] for name in ("trainer", "worker", "predictor")}
    keys_file = workdir / "service-keys"
    keys_file.write_text("".join(f"{name}={key}\n" for name, key in keys.items()))
    keys_file.chmod(0o600)
    serve_tls = {
        "LORAFORGE_TLS_CERT_FILE": str(server.cert),
        "LORAFORGE_TLS_KEY_FILE": str(server.key),
    }
    # Every process calls the others over TLS, with the client certificate the dataset asks for.
    call_tls = {
        "LORAFORGE_TLS_CA_FILE": str(ca.pem.cert),
        "LORAFORGE_TLS_CLIENT_CERT_FILE": str(client.cert),
        "LORAFORGE_TLS_CLIENT_KEY_FILE": str(client.key),
    }
    auth = {"LORAFORGE_AUTH": "on", "LORAFORGE_AUTH_CACHE_SECONDS": "0.5"}
    # Lets runs name the tiny model built under `workdir`.
    roots = {"LORAFORGE_MODEL_ROOTS": f"tests={workdir}"}
    started: list[ServiceProcess] = []
    worker: subprocess.Popen[bytes] | None = None
    try:
        dataset = start_service(
            "loraforge.services.dataset",
            workdir,
            env={
                **auth,
                **serve_tls,
                "LORAFORGE_TLS_CLIENT_CA_FILE": str(ca.pem.cert),
                "LORAFORGE_SERVICE_KEYS_FILE": str(keys_file),
            },
        )
        started.append(dataset)
        trainer = start_service(
            "loraforge.services.trainer",
            workdir,
            args=["--dataset-address", dataset.address, "--watch-poll-seconds", "0.1"],
            env={
                **auth,
                **serve_tls,
                **call_tls,
                **roots,
                "LORAFORGE_SERVICE_KEY": keys["trainer"],
                "LORAFORGE_AUTH_ADDRESS": dataset.address,
            },
        )
        started.append(trainer)
        worker_log = open(workdir / "worker.log", "ab")
        worker = subprocess.Popen(
            [
                sys.executable, "-m", "loraforge.services.trainer.worker",
                "--worker-id", "tls", "--poll-seconds", "0.2", "--cpu-threads", "1",
            ],
            stdout=worker_log, stderr=subprocess.STDOUT, cwd=REPO,
            env={
                **os.environ,
                **call_tls,
                **roots,
                "LORAFORGE_HOME": str(workdir / "home"),
                "LORAFORGE_DATASET_ADDRESS": dataset.address,
                "LORAFORGE_SERVICE_KEY": keys["worker"],
            },
        )  # fmt: skip
        worker_log.close()
        predictor = start_service(
            "loraforge.services.predictor",
            workdir,
            args=[
                *("--base-model", str(base), "--trainer-address", trainer.address),
                *("--engine", "transformers", "--dtype", "float32"),
            ],
            env={
                **auth,
                **serve_tls,
                **call_tls,
                "LORAFORGE_SERVICE_KEY": keys["predictor"],
                "LORAFORGE_AUTH_ADDRESS": dataset.address,
            },
            timeout=300,
        )
        started.append(predictor)
        openai = start_service(
            "loraforge.services.openai_api",
            workdir,
            args=["--predictor-address", predictor.address],
            env={**serve_tls, **call_tls},
        )
        started.append(openai)
        result = Cluster(
            workdir,
            ca,
            server,
            client,
            dataset,
            trainer,
            predictor,
            openai,
            worker,
            base,
            workdir / "home" / "admin.key",
        )
        assert result.admin_key.startswith("lf_")
        yield result
    finally:
        if worker is not None:
            _stop(worker)
        for service in reversed(started):
            service.stop()


@pytest.fixture(scope="module")
def small_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 96 rows of the demo's training data: enough for a few training steps."""
    path = tmp_path_factory.mktemp("data") / "small.csv"
    lines = demo_file("sentiment_train.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(lines[:97]), encoding="utf-8")
    return path


# ----- the tests -------------------------------------------------------------------------------


def test_python_client_runs_the_whole_workflow_over_tls_with_an_app_key(
    cluster: Cluster, small_csv: Path
) -> None:
    with cluster.client() as admin:
        assert admin.whoami().scopes == ["admin"]
        admin.create_app("tls", description="over TLS")
        key, secret = admin.create_api_key(
            "tls", ["read", "write", "train", "predict"], ttl_seconds=3600, description="test"
        )
        assert key.app == "apps/tls" and secret.startswith(key.prefix + "_")
        assert key.prefix in [k.prefix for k in admin.list_api_keys("tls")]
    with cluster.client(secret) as client:
        principal = client.whoami()
        assert (principal.app, sorted(principal.scopes)) == (
            "apps/tls",
            ["predict", "read", "train", "write"],
        )
        app = client.app("tls")
        dataset = app.create_dataset("news")
        report = dataset.upload_from_csv(small_csv)
        assert (report.rows_accepted, report.rows_rejected) == (96, 0)
        version = dataset.create_version()
        assert version.stats.example_count == 96
        model = app.create_model("clf", model_type_id="text-to-text")
        model.get_params(template="HuggingFace_AdvancedConfig")
        model.update_params(dataset_version=version, **TRAINING)
        model.update_params(model_config={"pretrained_model_name_or_path": str(cluster.base_model)})
        version_id = model.train()
        status = model.wait(version_id, timeout=600)
        assert (status.state, status.status_code) == ("TRAINED", 21100), status.description
        out = model.predict(["Net sales rose sharply ."], inference_params={"maxTokens": 4})
        assert out.outputs[0].completion_tokens > 0
        # An app key reaches nothing of another app.
        with pytest.raises(ClientError) as refused:
            client.create_app("other")
        assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED


def test_a_client_without_the_ca_or_in_plaintext_fails_unavailable(cluster: Cluster) -> None:
    other = CertificateAuthority(cluster.workdir / "other-pki", label="another CA")
    cases = {
        "plaintext": {"tls_ca_file": ""},
        "another CA": {"tls_ca_file": str(other.pem.cert), "tls_cert_file": "", "tls_key_file": ""},
    }
    for label, tls in cases.items():
        for service in ("dataset", "trainer", "predictor"):
            with cluster.client(**tls) as client:
                with pytest.raises(ClientError) as failed:
                    if service == "dataset":
                        client.list_apps()
                    elif service == "trainer":
                        client.list_templates()
                    else:
                        client.predict(["hi"], base_model=True)
            assert failed.value.code == grpc.StatusCode.UNAVAILABLE, (label, service)
            if label == "another CA":
                assert "TLS handshake failed" in str(failed.value), str(failed.value)
    # A CA file that is not there is refused before any call, naming it.
    with pytest.raises(ClientError) as missing:
        cluster.client(tls_ca_file=str(cluster.workdir / "nope.pem"))
    assert missing.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "nope.pem" in missing.value.message


def test_mtls_refuses_a_client_without_a_certificate(cluster: Cluster) -> None:
    with cluster.client(tls_cert_file="", tls_key_file="") as client:
        # The trainer serves TLS without asking for client certificates: the key is enough.
        assert client.list_templates()
        # The dataset service asks for one: the handshake fails.
        with pytest.raises(ClientError) as refused:
            client.list_apps()
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    # A certificate from another CA is refused too.
    other = CertificateAuthority(cluster.workdir / "rogue-pki", label="rogue CA").issue(
        "rogue", server=False
    )
    with cluster.client(tls_cert_file=str(other.cert), tls_key_file=str(other.key)) as client:
        with pytest.raises(ClientError) as rogue:
            client.list_apps()
    assert rogue.value.code == grpc.StatusCode.UNAVAILABLE


def test_a_call_without_a_key_over_tls_is_unauthenticated_with_a_hint(cluster: Cluster) -> None:
    with cluster.client(api_key="") as client, pytest.raises(ClientError) as refused:
        client.list_apps()
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "--api-key" in str(refused.value) and "loraforge keys create" in str(refused.value)


def test_health_checks_over_tls_need_no_key(cluster: Cluster) -> None:
    ca = ChannelSecurity(ca_file=str(cluster.ca.pem.cert))
    assert check(cluster.trainer.address, security=ca)[0]
    assert check(cluster.predictor.address, security=ca, server_name="localhost")[0]
    with_cert = ChannelSecurity(
        ca_file=str(cluster.ca.pem.cert),
        cert_file=str(cluster.client_pem.cert),
        key_file=str(cluster.client_pem.key),
    )
    assert check(cluster.dataset.address, security=with_cert)[0]
    serving, why = check(cluster.trainer.address)  # plaintext to a TLS server
    assert not serving and why.startswith("UNAVAILABLE")


def _cli(
    cluster: Cluster, *args: str, key_file: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **cluster.tls_env(), "COLUMNS": "200"}
    env.pop("LORAFORGE_API_KEY", None)
    env.pop("LORAFORGE_API_KEY_FILE", None)
    env["LORAFORGE_HOME"] = str(cluster.workdir / "cli-home")  # no admin.key there
    flags = ["--api-key-file", str(key_file)] if key_file else []
    return subprocess.run(
        [sys.executable, "-m", "loraforge.client.cli", *flags, *args],
        capture_output=True, text=True, timeout=120, env=env, cwd=cluster.workdir,
    )  # fmt: skip


def test_cli_creates_lists_and_revokes_keys_and_says_who_a_key_is(cluster: Cluster) -> None:
    admin = cluster.admin_key_file

    def ok(*args: str, key_file: Path | None = admin) -> str:
        result = _cli(cluster, *args, key_file=key_file)
        assert result.returncode == 0, result.stderr + result.stdout
        return result.stdout

    ok("apps", "create", "keys-cli")
    created = _cli(
        cluster, "keys", "create", "--app", "keys-cli", "--scopes", "read",
        "--expires", "90d", "--description", "a reader", key_file=admin,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert secret.startswith("lf_") and "\n" not in secret  # the key alone on stdout
    assert "shown only now" in created.stderr and "apps/keys-cli" in created.stderr
    key_file = cluster.workdir / "reader.key"
    key_file.write_text(secret + "\n")
    prefix = "_".join(secret.split("_")[:2])

    who = ok("whoami", key_file=key_file)
    assert "apps/keys-cli" in who and "read" in who
    listed = ok("keys", "list", "--app", "keys-cli")
    assert prefix in listed and "a reader" in listed and "active" in listed
    assert "apps/keys-cli" in ok("apps", "show", "keys-cli", key_file=key_file)
    # A reader's key cannot change anything.
    refused = _cli(cluster, "datasets", "create", "keys-cli/d", key_file=key_file)
    assert refused.returncode == 1 and "PERMISSION_DENIED" in refused.stderr

    assert "revoked" in ok("keys", "revoke", prefix)
    gone = _cli(cluster, "whoami", key_file=key_file)
    assert gone.returncode == 1
    line = " ".join(gone.stderr.split())
    assert line.startswith("error: UNAUTHENTICATED") and "--api-key" in line, line
    assert prefix not in ok("keys", "list", "--app", "keys-cli")
    assert "revoked" in ok("keys", "list", "--app", "keys-cli", "--all")

    # No key at all: one line that says where keys come from.
    bare = _cli(cluster, "apps", "list", key_file=None)
    assert bare.returncode == 1 and "UNAUTHENTICATED" in bare.stderr
    assert "loraforge keys create" in " ".join(bare.stderr.split())
    # A bad duration is a usage error before any call.
    bad = _cli(
        cluster, "keys", "create", "--app", "keys-cli", "--scopes", "read", "--expires", "soon"
    )
    assert bad.returncode == 1 and "--expires" in bad.stderr


def test_openai_api_serves_https_and_answers_401_without_a_valid_key(cluster: Cluster) -> None:
    url = f"https://127.0.0.1:{cluster.openai.port}/v1"
    verify = ssl.create_default_context(cafile=str(cluster.ca.pem.cert))
    with httpx.Client(verify=verify, timeout=60) as http:
        assert http.get(f"https://127.0.0.1:{cluster.openai.port}/health").status_code == 200
        auth = {"Authorization": f"Bearer {cluster.admin_key}"}
        models = http.get(f"{url}/models", headers=auth)
        assert models.status_code == 200, models.text
        body = {"model": models.json()["data"][0]["id"], "prompt": "Net sales", "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer lf_000000000000_" + "x" * 43}):
            for refused in (
                http.post(f"{url}/completions", json=body, headers=headers),
                http.get(f"{url}/models", headers=headers),  # not the list cached for the admin
            ):
                assert refused.status_code == 401, refused.text
                assert refused.json()["error"]["type"] == "authentication_error"
        done = http.post(f"{url}/completions", json=body, headers=auth)
        assert done.status_code == 200, done.text
        assert done.json()["usage"]["completion_tokens"] > 0
    # Plain HTTP to the HTTPS port gets no answer.
    with pytest.raises(httpx.HTTPError), httpx.Client(timeout=10) as plain:
        plain.get(f"http://127.0.0.1:{cluster.openai.port}/health").raise_for_status()


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js")
def test_node_client_runs_the_whole_workflow_over_tls_with_a_key(
    cluster: Cluster, small_csv: Path
) -> None:
    assert (REPO / "node_modules" / "@grpc" / "grpc-js").is_dir(), "run `make setup` (npm install)"
    env = {
        **os.environ,
        **cluster.tls_env(),
        "LORAFORGE_API_KEY_FILE": str(cluster.admin_key_file),
    }
    env.pop("LORAFORGE_API_KEY", None)
    result = subprocess.run(
        ["node", "clients/node/workflow.mjs", str(small_csv), str(cluster.base_model)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["upload"]["accepted"] == 96
    assert summary["training"]["final_state"] == "MODEL_VERSION_STATE_TRAINED"
    assert summary["stream"]["text"] == summary["predict"]["text"]
    # Without a key the Node client stops at its first call, saying why.
    env.pop("LORAFORGE_API_KEY_FILE")
    env["LORAFORGE_HOME"] = str(cluster.workdir / "node-home")
    refused = subprocess.run(
        ["node", "clients/node/workflow.mjs", str(small_csv)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
    # Without the CA, the TLS services cannot be reached.
    env.pop("LORAFORGE_TLS_CA_FILE")
    env["LORAFORGE_API_KEY_FILE"] = str(cluster.admin_key_file)
    unreachable = subprocess.run(
        ["node", "clients/node/workflow.mjs", str(small_csv)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert unreachable.returncode == 1 and "UNAVAILABLE" in unreachable.stderr
