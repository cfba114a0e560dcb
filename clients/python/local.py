"""Runs the whole platform on one machine: dataset, trainer, a worker, the predictor and the
OpenAI-compatible HTTP API in front of it.

Each service is its own process (as in production), started with the embedded
defaults under one home folder: SQLite files, a local object store, logs in
`<home>/logs/`; `database_urls` and `object_store_url` put the state elsewhere
(PostgreSQL, S3) instead. A state file records the processes so `loraforge down` can stop
what `loraforge up` started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraforge.client.client import DEFAULT_ADDRESSES

STATE_FILE = "cluster.json"
OPENAI_PORT = 8000  # the port vLLM's OpenAI-compatible server uses, which clients often assume


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes] | None
    pid: int
    port: int
    log: Path


@dataclass
class LocalCluster:
    """The services of one machine. `ports` of 0 pick free ports (tests run several at once)."""

    home: Path
    base_model: str
    ports: dict[str, int] = field(
        default_factory=lambda: {
            **{k: int(v.rsplit(":", 1)[1]) for k, v in DEFAULT_ADDRESSES.items()},
            "openai": OPENAI_PORT,
        }
    )
    workers: int = 1
    extra_env: dict[str, str] = field(default_factory=dict)
    # Metadata stores by service ("dataset", "trainer"; workers use the trainer's); a service
    # without one keeps its SQLite file under `home`.
    database_urls: dict[str, str] = field(default_factory=dict)
    # The object store every process shares (empty: `home`/objects).
    object_store_url: str = ""
    procs: dict[str, Proc] = field(default_factory=dict)

    def address(self, service: str) -> str:
        return f"127.0.0.1:{self.procs[service].port}"

    @property
    def openai_url(self) -> str:
        """Base URL of the OpenAI-compatible API (what `base_url` of an OpenAI client takes)."""
        return f"http://{self.address('openai')}/v1"

    @property
    def addresses(self) -> dict[str, str]:
        return {s: self.address(s) for s in ("dataset", "trainer", "predictor")}

    def _env(self) -> dict[str, str]:
        return {
            **os.environ,
            "LORAFORGE_HOME": str(self.home),
            "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
            "TOKENIZERS_PARALLELISM": "false",
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
            **self.extra_env,
        }

    def _stores(self, database: str | None) -> list[str]:
        """The flags that point a process at its metadata store and the object store."""
        flags: list[str] = []
        if database is not None and self.database_urls.get(database):
            flags += ["--database-url", self.database_urls[database]]
        if self.object_store_url:
            flags += ["--object-store-url", self.object_store_url]
        return flags

    def _spawn(self, name: str, module: str, args: list[str], port: int | None) -> Proc:
        logs = self.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{name}.log"
        cmd = [sys.executable, "-m", module, *args]
        ready = logs / f"{name}.port"
        if port is not None:
            ready.unlink(missing_ok=True)
            cmd += ["--port", str(port), "--ready-file", str(ready)]
        with open(log, "ab") as fh:
            popen = subprocess.Popen(
                cmd, stdout=fh, stderr=subprocess.STDOUT, env=self._env(), start_new_session=True
            )
        proc = Proc(name, popen, popen.pid, port or 0, log)
        self.procs[name] = proc
        return proc

    def _wait_ready(self, proc: Proc, timeout: float) -> None:
        ready = self.home / "logs" / f"{proc.name}.port"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready.exists() and ready.read_text().strip():
                proc.port = int(ready.read_text())
                check = _http_serving if proc.name == "openai" else _serving
                if check(f"127.0.0.1:{proc.port}"):
                    return
            if proc.popen is not None and proc.popen.poll() is not None:
                lines = proc.log.read_text(errors="replace").strip().splitlines()
                last = f": {lines[-1].strip()}" if lines else ""
                raise RuntimeError(
                    f"the {proc.name} service exited ({proc.popen.returncode}){last} "
                    f"(its whole log: {proc.log})"
                )
            time.sleep(0.2)
        raise RuntimeError(
            f"the {proc.name} service did not start within {timeout:.0f}s; see {proc.log}"
        )

    def start(self, timeout: float = 300) -> None:
        """Starts every service and waits until each answers its health check."""
        self.home.mkdir(parents=True, exist_ok=True)
        try:
            dataset = self._spawn(
                "dataset",
                "loraforge.services.dataset",
                self._stores("dataset"),
                self.ports["dataset"],
            )
            self._wait_ready(dataset, timeout)
            dataset_flag = ["--dataset-address", self.address("dataset")]
            trainer_flags = [*dataset_flag, *self._stores("trainer")]
            trainer = self._spawn(
                "trainer", "loraforge.services.trainer", trainer_flags, self.ports["trainer"]
            )
            self._wait_ready(trainer, timeout)
            predictor = self._spawn(
                "predictor",
                "loraforge.services.predictor",
                [
                    *("--trainer-address", self.address("trainer")),
                    *("--base-model", self.base_model),
                    *self._stores(None),
                ],
                self.ports["predictor"],
            )
            for i in range(self.workers):
                self._spawn(
                    f"worker-{i + 1}", "loraforge.services.trainer.worker", trainer_flags, None
                )
            self._wait_ready(predictor, timeout)
            api = self._spawn(
                "openai",
                "loraforge.services.openai_api",
                [
                    *("--predictor-address", self.address("predictor")),
                    *("--trainer-address", self.address("trainer")),
                    *dataset_flag,
                ],
                self.ports.get("openai", 0),
            )
            self._wait_ready(api, timeout)
        except BaseException:
            self.stop()
            raise
        self._save_state()

    def _save_state(self) -> None:
        state = {
            name: {"pid": p.pid, "port": p.port, "log": str(p.log)}
            for name, p in self.procs.items()
        }
        (self.home / STATE_FILE).write_text(
            json.dumps({"base_model": self.base_model, "processes": state}, indent=2)
        )

    def stop(self, timeout: float = 60) -> None:
        """Stops workers first (they requeue their runs), then the services; SIGKILL after `timeout`."""
        order = sorted(
            self.procs.values(),
            key=lambda p: (not p.name.startswith("worker"), p.name == "dataset"),
        )
        for proc in order:
            _terminate(proc.pid)
        deadline = time.monotonic() + timeout
        for proc in order:
            while _alive(proc) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(proc):
                os.killpg(proc.pid, signal.SIGKILL)
            if proc.popen is not None:
                proc.popen.wait()
        self.procs.clear()
        (self.home / STATE_FILE).unlink(missing_ok=True)

    @classmethod
    def attach(cls, home: Path) -> LocalCluster | None:
        """The cluster a previous `start` recorded under `home`, if it is still running."""
        path = home / STATE_FILE
        if not path.exists():
            return None
        state = json.loads(path.read_text())
        cluster = cls(home=home, base_model=state["base_model"])
        for name, p in state["processes"].items():
            cluster.procs[name] = Proc(name, None, p["pid"], p["port"], Path(p["log"]))
        if not any(_alive(p) for p in cluster.procs.values()):
            path.unlink(missing_ok=True)
            return None
        return cluster


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as ch:
        try:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _http_serving(address: str) -> bool:
    try:
        return httpx.get(f"http://{address}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _terminate(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def _alive(proc: Proc) -> bool:
    if proc.popen is not None:
        return proc.popen.poll() is None
    try:
        os.kill(proc.pid, 0)
    except ProcessLookupError:
        return False
    return True
