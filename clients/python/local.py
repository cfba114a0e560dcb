"""Runs the whole platform on one machine: dataset, trainer, a worker, the predictor, the
OpenAI-compatible HTTP API in front of it and the web console.

Each service is its own process (as in production), started with the embedded
defaults under one home folder: SQLite files, a local object store, logs in
`<home>/logs/`; `database_urls` and `object_store_url` put the state elsewhere
(PostgreSQL, S3) instead. A state file records the processes so `loraforge down` can stop
what `loraforge up` started.

API keys are on (unless `auth` is false; its default is `LORAFORGE_AUTH`, on when unset):
each start makes new keys for the trainer, the workers and the predictor, writes them
to `<home>/service-keys` (mode 0600) for the dataset service, and gives each process its
own; the dataset service writes the admin key to `<home>/admin.key` (0600), which the
CLI and the demo then use. The services listen on 127.0.0.1 only, in plaintext.

Each worker runs under a supervisor process (`python -m loraforge.client.local
supervise ...`, the process `loraforge down` stops): a worker that dies (the kernel
killed it for memory, say) is started again, after a pause that grows while it keeps
dying, and its log says "worker exited (code C); restarting". A worker that stops on
its own (code 0), or refuses its settings (code 2), is not restarted. The worker's
current process id is in `<home>/logs/<name>.pid`.

A start waits on what each process reports, not on a fixed clock: every service keeps
`<home>/logs/<name>.progress` current (its step and a heartbeat) until it serves, and
the wait fails only if the process exits or its reports stop changing for
`stall_timeout` seconds. A first start on a busy machine may take long; it does not fail
for that.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from loraforge.client.client import DEFAULT_ADDRESSES
from loraforge.services.common.auth import new_api_key, write_secret_file
from loraforge.services.common.channels import read_key_file
from loraforge.services.common.errors import InvalidArgument
from loraforge.services.common.healthcheck import check
from loraforge.services.common.progress import PROGRESS_FILE_ENV, Progress, read_progress

STATE_FILE = "cluster.json"
SERVICE_KEYS_FILE = "service-keys"
ADMIN_KEY_FILE = "admin.key"
# The processes that call other services with a key of their own.
SERVICE_IDENTITIES = ("trainer", "worker", "predictor")
OPENAI_PORT = 8000  # the port vLLM's OpenAI-compatible server uses, which clients often assume
CONSOLE_PORT = 8080  # the web console
HTTP_SERVICES = ("openai", "console")  # health-checked over HTTP, not gRPC
STALL_TIMEOUT_ENV = "LORAFORGE_START_STALL_SECONDS"
DEFAULT_STALL_TIMEOUT = 600.0
# Called with a process's name and its step each time a starting process reports a new one.
ProgressCallback = Callable[[str, str], None]
WORKER_MODULE = "loraforge.services.trainer.worker"
# Seconds before a dead worker is started again: the n-th restart in a row waits the n-th
# (the last once they run out); a worker that ran RESTART_RESET_SECONDS starts the count anew.
RESTART_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)
RESTART_RESET_SECONDS = 60.0
USAGE_EXIT_CODE = 2  # a process that refuses its settings exits with this: restarting cannot help


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
            "console": CONSOLE_PORT,
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
    # API keys on every call (the services' `auth` setting).
    auth: bool = field(default_factory=lambda: auth_from_env())
    # This start's service keys, by identity (empty with auth off).
    service_keys: dict[str, str] = field(default_factory=dict)
    # How long a starting process may go without reporting progress before the start fails
    # (None: LORAFORGE_START_STALL_SECONDS, else DEFAULT_STALL_TIMEOUT).
    stall_timeout: float | None = None

    @property
    def admin_key_file(self) -> Path:
        """Where the dataset service writes the admin key."""
        return self.home / ADMIN_KEY_FILE

    def api_key(self) -> str:
        """The admin key, for clients of this cluster ('' with auth off)."""
        if not self.auth:
            return ""
        try:
            return read_key_file(str(self.admin_key_file), "the admin key")
        except InvalidArgument as exc:
            raise RuntimeError(
                f"{exc.message}; the dataset service writes it at its first start with API keys "
                f"on (its log: {self.home / 'logs' / 'dataset.log'})"
            ) from None

    def address(self, service: str) -> str:
        return f"127.0.0.1:{self.procs[service].port}"

    @property
    def openai_url(self) -> str:
        """Base URL of the OpenAI-compatible API (what `base_url` of an OpenAI client takes)."""
        return f"http://{self.address('openai')}/v1"

    @property
    def console_url(self) -> str:
        """Address of the web console."""
        return f"http://{self.address('console')}/"

    @property
    def addresses(self) -> dict[str, str]:
        return {s: self.address(s) for s in ("dataset", "trainer", "predictor")}

    def _env(self, name: str) -> dict[str, str]:
        return {
            **os.environ,
            "LORAFORGE_HOME": str(self.home),
            "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
            "TOKENIZERS_PARALLELISM": "false",
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
            **self._auth_env(name),
            **self._model_roots_env(name),
            **self.extra_env,
        }

    def _model_roots_env(self, name: str) -> dict[str, str]:
        """A `--base-model` folder is one users may train on: a model root of its own."""
        folder = Path(self.base_model).expanduser()
        if not (name == "trainer" or name.startswith("worker")) or not folder.is_dir():
            return {}
        return {"LORAFORGE_MODEL_ROOTS": f"models={self.home / 'models'},served={folder.resolve()}"}

    def _auth_env(self, name: str) -> dict[str, str]:
        """What process `name` needs for API keys: its own key, where keys are checked."""
        if not self.auth:
            return {"LORAFORGE_AUTH": "off"}
        env = {"LORAFORGE_AUTH": "on"}
        if name == "dataset":
            env["LORAFORGE_SERVICE_KEYS_FILE"] = str(self.home / SERVICE_KEYS_FILE)
            env["LORAFORGE_ADMIN_KEY_FILE"] = str(self.admin_key_file)
            return env
        identity = "worker" if name.startswith("worker") else name
        if identity in self.service_keys:
            env["LORAFORGE_SERVICE_KEY"] = self.service_keys[identity]
        if identity in ("trainer", "predictor"):
            env["LORAFORGE_AUTH_ADDRESS"] = self.address("dataset")
        return env

    def _write_service_keys(self) -> None:
        """New keys for the trainer, the workers and the predictor, in a file only we read."""
        self.service_keys = {name: new_api_key()[1] for name in SERVICE_IDENTITIES}
        header = "# service identities' keys for the dataset service (`loraforge up`)\n"
        lines = "".join(f"{name}={key}\n" for name, key in self.service_keys.items())
        write_secret_file(self.home / SERVICE_KEYS_FILE, header + lines)

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
        env = self._env(name)
        if port is not None:
            ready.unlink(missing_ok=True)
            progress = logs / f"{name}.progress"
            progress.unlink(missing_ok=True)
            cmd += ["--port", str(port), "--ready-file", str(ready)]
            env[PROGRESS_FILE_ENV] = str(progress)
        with open(log, "ab") as fh:
            popen = subprocess.Popen(
                cmd,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        proc = Proc(name, popen, popen.pid, port or 0, log)
        self.procs[name] = proc
        return proc

    def _wait_ready(
        self, proc: Proc, stall_timeout: float, on_progress: ProgressCallback | None
    ) -> None:
        logs = self.home / "logs"
        proc.port = wait_until_serving(
            proc,
            logs / f"{proc.name}.port",
            logs / f"{proc.name}.progress",
            stall_timeout,
            on_progress,
            http=proc.name in HTTP_SERVICES,
        )

    def _check_ports_free(self) -> None:
        """A port another program holds (another `loraforge up`, say) is named before any
        process starts, with what to do about it."""
        taken = [
            f"{port} ({name})" for name, port in self.ports.items() if port and not _port_free(port)
        ]
        if taken:
            raise RuntimeError(
                f"port {', '.join(taken)} on 127.0.0.1 is in use, perhaps by another "
                "`loraforge up`; choose other ports (--base-port N, or 0 for any free port: "
                "--dataset-port 0 and the like) or stop what holds them"
            )

    def start(
        self, timeout: float | None = None, on_progress: ProgressCallback | None = None
    ) -> None:
        """Starts every service and waits until each answers its health check.

        `timeout` is the stall deadline (default `stall_timeout`): how long a starting
        process may go without reporting progress, not a bound on the whole start.
        `on_progress(name, step)` hears each step a starting process reports.
        """
        stall = timeout or self.stall_timeout or stall_timeout_from_env()
        self._check_ports_free()
        self.home.mkdir(parents=True, exist_ok=True)
        if self.auth:
            self._write_service_keys()
        try:
            dataset = self._spawn(
                "dataset",
                "loraforge.services.dataset",
                self._stores("dataset"),
                self.ports["dataset"],
            )
            self._wait_ready(dataset, stall, on_progress)
            self.api_key()  # the admin key is there (or the start stops, saying where to look)
            dataset_flag = ["--dataset-address", self.address("dataset")]
            trainer_flags = [*dataset_flag, *self._stores("trainer")]
            # The trainer's evaluations call the predictor, which starts after it: its port is
            # chosen now.
            predictor_port = self.ports["predictor"] or _free_port()
            trainer = self._spawn(
                "trainer",
                "loraforge.services.trainer",
                [*trainer_flags, "--predictor-address", f"127.0.0.1:{predictor_port}"],
                self.ports["trainer"],
            )
            self._wait_ready(trainer, stall, on_progress)
            predictor = self._spawn(
                "predictor",
                "loraforge.services.predictor",
                [
                    *("--trainer-address", self.address("trainer")),
                    *("--base-model", self.base_model),
                    *self._stores(None),
                ],
                predictor_port,
            )
            for i in range(self.workers):
                name = f"worker-{i + 1}"
                pid_file = self.home / "logs" / f"{name}.pid"
                self._spawn(
                    name,
                    "loraforge.client.local",
                    ["supervise", "--pid-file", str(pid_file), "--", WORKER_MODULE, *trainer_flags],
                    None,
                )
            self._wait_ready(predictor, stall, on_progress)
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
            console = self._spawn(
                "console",
                "loraforge.services.console",
                [
                    *dataset_flag,
                    *("--trainer-address", self.address("trainer")),
                    *("--predictor-address", self.address("predictor")),
                ],
                self.ports.get("console", 0),
            )
            self._wait_ready(api, stall, on_progress)
            self._wait_ready(console, stall, on_progress)
            for proc in self.procs.values():  # a worker that could not start is gone by now
                if proc.name.startswith("worker") and not _alive(proc):
                    raise RuntimeError(_exit_line(proc, "worker"))
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


def auth_from_env() -> bool:
    """API keys on, unless `LORAFORGE_AUTH` says off (the services' own variable)."""
    return os.environ.get("LORAFORGE_AUTH", "on").strip().lower() not in ("off", "false", "0")


def stall_timeout_from_env() -> float:
    """`LORAFORGE_START_STALL_SECONDS`, else DEFAULT_STALL_TIMEOUT."""
    text = os.environ.get(STALL_TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_STALL_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if seconds <= 0:
        raise RuntimeError(
            f"{STALL_TIMEOUT_ENV}={text!r}: give the seconds a starting service may go "
            "without reporting progress, a number above 0"
        )
    return seconds


def wait_until_serving(
    proc: Proc,
    ready: Path,
    progress: Path,
    stall_timeout: float,
    on_progress: ProgressCallback | None = None,
    *,
    http: bool = False,
) -> int:
    """Waits until `proc` has written its port to `ready` and answers its health check;
    returns the port. Fails if the process exits, or if what it reports in `progress` (its
    step and heartbeat) stays the same for `stall_timeout` seconds."""
    last: Progress | None = None
    step = ""
    changed = time.monotonic()  # the start counts as progress
    while True:
        text = _read_text(ready)
        if text:
            port = int(text)
            if (_http_serving if http else _serving)(f"127.0.0.1:{port}"):
                return port
        if proc.popen is not None and proc.popen.poll() is not None:
            raise RuntimeError(_exit_line(proc, "service"))
        now = time.monotonic()
        seen = read_progress(progress)
        if seen is not None and seen != last:
            last, changed = seen, now
            if seen.step != step:
                step = seen.step
                if on_progress is not None:
                    on_progress(proc.name, step)
        elif now - changed > stall_timeout:
            doing = f" (its last report: {step})" if step else " (it reported nothing)"
            raise RuntimeError(
                f"the {proc.name} service has reported no progress for {stall_timeout:.0f}s"
                f"{doing}; see {proc.log}. On a very busy machine, allow longer with "
                f"{STALL_TIMEOUT_ENV}"
            )
        time.sleep(0.2)


def _read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        # As the services bind: a port left in TIME_WAIT by a stopped service is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _serving(address: str) -> bool:
    return check(address, timeout=2)[0]


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


def _exit_line(proc: Proc, kind: str) -> str:
    """One line on a process that exited: its code, its log's last line, where the log is."""
    lines = proc.log.read_text(errors="replace").strip().splitlines()
    last = f": {lines[-1].strip()}" if lines else ""
    code = proc.popen.returncode if proc.popen is not None else "?"
    return f"the {proc.name} {kind} exited ({code}){last} (its whole log: {proc.log})"


def _alive(proc: Proc) -> bool:
    if proc.popen is not None:
        return proc.popen.poll() is None
    try:
        os.kill(proc.pid, 0)
    except ProcessLookupError:
        return False
    return True


def supervise(command: list[str], pid_file: Path | None = None) -> int:
    """Runs `python -m command...` and starts it again each time it dies, until this process
    is told to stop (SIGTERM, SIGINT: passed on to it); returns its last exit code.

    It is not restarted when it exits with 0 (it stopped on its own) or USAGE_EXIT_CODE."""
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    restarts = 0
    while True:
        started = time.monotonic()
        child = subprocess.Popen([sys.executable, "-m", *command])
        if pid_file is not None:
            pid_file.write_text(f"{child.pid}\n")
        code = child.wait()
        if stopping or code in (0, USAGE_EXIT_CODE):
            return code
        if time.monotonic() - started >= RESTART_RESET_SECONDS:
            restarts = 0
        delay = RESTART_DELAYS[min(restarts, len(RESTART_DELAYS) - 1)]
        restarts += 1
        _say(f"worker exited (code {code}); restarting in {delay:g}s")
        deadline = time.monotonic() + delay
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.1)
        if stopping:
            return code


def _say(message: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    print(f"{stamp} supervisor: {message}", flush=True)


def _supervise_main(argv: list[str]) -> int:
    """`supervise [--pid-file FILE] -- MODULE ARGS...`"""
    if "--" not in argv or argv[0] != "supervise":
        print(
            "usage: python -m loraforge.client.local supervise [--pid-file FILE] -- MODULE [ARGS...]"
        )
        return USAGE_EXIT_CODE
    options, command = argv[1 : argv.index("--")], argv[argv.index("--") + 1 :]
    pid_file = Path(options[1]) if options[:1] == ["--pid-file"] and len(options) == 2 else None
    if not command or (options and pid_file is None):
        print(
            "usage: python -m loraforge.client.local supervise [--pid-file FILE] -- MODULE [ARGS...]"
        )
        return USAGE_EXIT_CODE
    return supervise(command, pid_file)


if __name__ == "__main__":
    sys.exit(_supervise_main(sys.argv[1:]))
