"""Helpers tests share: free ports, service processes, an S3 server."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parent.parent
# Workers the tests start do not spend this (busy) machine's CPU measuring their training
# throughput at start; tests/test_training_calibration.py turns it on where it tests it.
os.environ.setdefault("LORAFORGE_CALIBRATE_TRAINING", "false")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServiceProcess:
    """A service started as a real subprocess, and the port it bound."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait()
        return self.proc.returncode


def start_service(
    module: str,
    workdir: Path,
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    timeout: float = 120,
    name: str | None = None,
    new_session: bool = False,
) -> ServiceProcess:
    """Starts `python -m module --port 0 ...` and waits until it has written its port.

    `new_session`: in a process group of its own (with any children it starts), as a
    process manager runs a service, so that a test can signal the whole group."""
    name = name or module.rsplit(".", 1)[-1]
    workdir.mkdir(parents=True, exist_ok=True)
    ready = workdir / f"{name}.port"
    ready.unlink(missing_ok=True)
    log_path = workdir / f"{name}.log"
    full_env = {
        **os.environ,
        "LORAFORGE_HOME": str(workdir / "home"),
        # Tests never reach the hub: a model that is not on this machine is refused at once.
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        # Predictors choose their engine by rule, not by a measurement of this (busy) machine;
        # the calibration tests turn it on.
        "LORAFORGE_CALIBRATE_ENGINES": "false",
        # API keys are off unless a test turns them on (tests/test_auth.py, tests/test_tls.py).
        "LORAFORGE_AUTH": "off",
        **(env or {}),
    }
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, "--port", "0", "--ready-file", str(ready), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=REPO,
            start_new_session=new_session,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready.exists() and ready.read_text().strip():
            return ServiceProcess(proc, int(ready.read_text()), log_path)
        if proc.poll() is not None:
            raise RuntimeError(f"{module} exited with {proc.returncode}:\n{log_path.read_text()}")
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{module} did not start within {timeout}s:\n{log_path.read_text()}")


@contextlib.contextmanager
def running_service(module: str, workdir: Path, **kwargs: object) -> Iterator[ServiceProcess]:
    svc = start_service(module, workdir, **kwargs)  # type: ignore[arg-type]
    try:
        yield svc
    finally:
        svc.stop()


@dataclass
class KeyedServices:
    """The dataset service, a trainer and a predictor with API keys on, each process with its
    own service key, and the admin key the dataset service wrote at its first start."""

    dataset: ServiceProcess
    trainer: ServiceProcess
    predictor: ServiceProcess
    admin_key: str
    service_keys: dict[str, str]
    auth_env: dict[str, str]  # what every process of the cluster runs with


def start_keyed_services(
    workdir: Path,
    base: Path,
    started: list[ServiceProcess],
    *,
    predictor_args: Sequence[str] = ("--engine", "transformers", "--dtype", "float32"),
    trainer_args: Sequence[str] = (),
    trainer_env: dict[str, str] | None = None,
    predictor_timeout: float = 300,
) -> KeyedServices:
    """Starts the three services on `base` with keys on (the auth cache 0.3 s, so revocations
    reach them at once), appending each to `started` as it comes up, for the caller to stop."""
    import secrets

    service_keys = {name: secrets.token_urlsafe(32) for name in ("trainer", "worker", "predictor")}
    keys_file = workdir / "service-keys"
    keys_file.write_text("".join(f"{k}={v}\n" for k, v in service_keys.items()))
    auth = {"LORAFORGE_AUTH": "on", "LORAFORGE_AUTH_CACHE_SECONDS": "0.3"}
    dataset = start_service(
        "loraforge.services.dataset",
        workdir,
        env={**auth, "LORAFORGE_SERVICE_KEYS_FILE": str(keys_file)},
    )
    started.append(dataset)
    trainer = start_service(
        "loraforge.services.trainer",
        workdir,
        args=["--dataset-address", dataset.address, *trainer_args],
        env={**auth, "LORAFORGE_SERVICE_KEY": service_keys["trainer"], **(trainer_env or {})},
    )
    started.append(trainer)
    predictor = start_service(
        "loraforge.services.predictor",
        workdir,
        args=[
            *("--base-model", str(base), "--trainer-address", trainer.address),
            *predictor_args,
        ],
        env={
            **auth,
            "LORAFORGE_SERVICE_KEY": service_keys["predictor"],
            "LORAFORGE_AUTH_ADDRESS": dataset.address,
        },
        timeout=predictor_timeout,
    )
    started.append(predictor)
    admin_key = (workdir / "home" / "admin.key").read_text().strip()
    return KeyedServices(dataset, trainer, predictor, admin_key, service_keys, auth)


def channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(
        address,
        options=[
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
        ],
    )


def wait_until(condition: Callable[[], bool], timeout: float = 60) -> bool:
    """Polls `condition` until it holds; False if it still does not after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def error_details(err: grpc.RpcError) -> tuple[str, dict[str, str]]:
    """An error's ErrorInfo reason and its field violations (field path -> description)."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    reason, fields = "", {}
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields = {v.field: v.description for v in bad.field_violations}
    return reason, fields


@dataclass
class S3Server:
    """A moto S3-compatible server on 127.0.0.1 and the URL to reach a bucket on it."""

    endpoint: str

    def url(self, bucket: str, prefix: str = "") -> str:
        return f"s3://{bucket}/{prefix}?endpoint={self.endpoint}&secure=false"


@contextlib.contextmanager
def s3_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    old = {k: os.environ.get(k) for k in ("LORAFORGE_S3_ACCESS_KEY", "LORAFORGE_S3_SECRET_KEY")}
    os.environ["LORAFORGE_S3_ACCESS_KEY"] = "testing"
    os.environ["LORAFORGE_S3_SECRET_KEY"] = "testing"
    try:
        yield S3Server(f"127.0.0.1:{port}")
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# PostgreSQL the suite runs against besides SQLite (trust auth on this machine and in CI).
POSTGRES_ADMIN_URL = os.environ.get(
    "LORAFORGE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def postgres_available() -> str:
    """'' when PostgreSQL answers at POSTGRES_ADMIN_URL, else why not."""
    try:
        import sqlalchemy
    except ImportError as exc:  # pragma: no cover - sqlalchemy is a dependency
        return str(exc)
    try:
        engine = sqlalchemy.create_engine(POSTGRES_ADMIN_URL)
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
        engine.dispose()
    except Exception as exc:  # no driver, no server, no access: all mean "not here"
        return f"PostgreSQL at {POSTGRES_ADMIN_URL} is not usable: {type(exc).__name__}: {exc}"
    return ""


class Databases:
    """Fresh databases of one backend, one per name, dropped at `close`.

    `sqlite`: files under `folder`. `postgresql`: `loraforge_test_<random>` databases
    created on the server at POSTGRES_ADMIN_URL.
    """

    def __init__(self, backend: str, folder: Path) -> None:
        self.backend = backend
        self.folder = folder
        self._urls: dict[str, str] = {}
        self._created: list[str] = []

    def url(self, name: str) -> str:
        if name not in self._urls:
            self._urls[name] = self._create(name)
        return self._urls[name]

    def _create(self, name: str) -> str:
        if self.backend == "sqlite":
            return f"sqlite:///{self.folder / (name + '.db')}"
        import secrets

        import sqlalchemy

        database = f"loraforge_test_{secrets.token_hex(6)}"
        admin = sqlalchemy.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{database}"'))
        admin.dispose()
        self._created.append(database)
        return str(sqlalchemy.make_url(POSTGRES_ADMIN_URL).set(database=database))

    def close(self) -> None:
        if not self._created:
            return
        import sqlalchemy

        admin = sqlalchemy.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            for database in self._created:
                conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        admin.dispose()
        self._created.clear()


def start_worker(
    workdir: Path, dataset_address: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Starts a training worker (`python -m loraforge.services.trainer.worker`) on the
    trainer database in `workdir`'s home, polling every 0.2 s; its log is `worker.log`."""
    full_env = {
        **os.environ,
        "LORAFORGE_HOME": str(workdir / "home"),
        "LORAFORGE_DATASET_ADDRESS": dataset_address,
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        **(env or {}),
    }
    with open(workdir / "worker.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "loraforge.services.trainer.worker", "--poll-seconds", "0.2"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=REPO,
        )


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds; nothing for one already gone."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
