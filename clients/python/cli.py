"""`loraforge`: run the platform and every user step from a terminal.

Errors print as one line on stderr with a non-zero exit code, never a traceback; so does a
training run that ends FAILED or CANCELLED. Text from the services goes through rich
escaped, so `[brackets]` in it print as they are.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from google.protobuf import json_format
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from loraforge.auth.v1 import auth_service_pb2 as apb
from loraforge.client.client import (
    DEFAULT_ADDRESSES,
    Client,
    ClientError,
    Model,
    SweepCandidate,
    client_security,
    model_name,
    resource_name,
)
from loraforge.client.client import version_name as full_version_name
from loraforge.client.local import CONSOLE_PORT, OPENAI_PORT, LocalCluster
from loraforge.client.params import load_yaml, merge, parameter_default, template_defaults
from loraforge.dataset.v1 import dataset_service_pb2 as dpb
from loraforge.predictor.v1 import predictor_service_pb2 as ppb
from loraforge.services.common.base_models import DEFAULT_BASE_MODEL
from loraforge.trainer.v1 import evaluation_pb2 as epb
from loraforge.trainer.v1 import trainer_service_pb2 as tpb

console = Console()
err_console = Console(stderr=True)


def default_home() -> Path:
    return Path(os.environ.get("LORAFORGE_HOME", Path.home() / ".loraforge"))


class UsageError(Exception):
    """A command-line mistake; printed as one line."""


class RunEnded(Exception):
    """A followed training run ended FAILED or CANCELLED; printed as one line."""


def _name(arg: str, *kinds: str) -> str:
    """Accepts a full resource name (`apps/a/datasets/d`) or its short form (`a/d`)."""
    try:
        return resource_name(arg, *kinds)
    except ClientError as exc:
        raise UsageError(exc.message) from None


def _one_line(text: str) -> str:
    """Server text for a one-line message: its lines joined, escaped for rich."""
    return escape(" ".join(line.strip() for line in text.splitlines() if line.strip()))


def _client(args: argparse.Namespace) -> Client:
    if args.api_key is not None and args.api_key_file is not None:
        raise UsageError("pass --api-key or --api-key-file, not both")
    security = client_security(
        args.api_key,
        args.tls_ca_file,
        args.tls_client_cert_file,
        args.tls_client_key_file,
        api_key_file=args.api_key_file,
    )
    return Client(
        args.dataset_address,
        args.trainer_address,
        args.predictor_address,
        api_key=security.api_key,
        tls_ca_file=security.ca_file,
        tls_cert_file=security.cert_file,
        tls_key_file=security.key_file,
    )


# ----- services ---------------------------------------------------------------------------


SERVICES = ("dataset", "trainer", "predictor")


def _chosen_ports(args: argparse.Namespace) -> dict[str, int]:
    """The ports `up` was asked for: consecutive from --base-port, then each --SERVICE-port."""
    chosen: dict[str, int] = {}
    if args.base_port is not None:
        if not 1 <= args.base_port <= 65535 - len(SERVICES) + 1:
            raise UsageError(
                f"--base-port must be 1 to {65535 - len(SERVICES) + 1} (got {args.base_port}): "
                f"the {len(SERVICES)} services take it and the ports after it"
            )
        chosen = {name: args.base_port + i for i, name in enumerate(SERVICES)}
    for name in SERVICES:
        port = getattr(args, f"{name}_port")
        if port is None:
            continue
        if not 0 <= port <= 65535:
            raise UsageError(f"--{name}-port must be 0 (any free port) to 65535 (got {port})")
        chosen[name] = port
    taken = [p for p in chosen.values() if p]
    if len(taken) != len(set(taken)):
        raise UsageError(f"two services cannot share a port (asked for {chosen})")
    return chosen


def start_cluster(cluster: LocalCluster, what: str) -> None:
    """Starts `cluster`, showing what each process reports while it starts."""
    with console.status(f"starting {what}...") as status:

        def show(name: str, step: str) -> None:
            console.print(
                f"  [dim]{escape(name)}: {escape(step)}[/dim]", highlight=False, soft_wrap=True
            )
            status.update(f"{escape(name)}: {escape(step)}...")

        cluster.start(on_progress=show)


def cmd_up(args: argparse.Namespace) -> None:
    home = Path(args.home)
    if LocalCluster.attach(home):
        raise UsageError(f"services are already running from {home}; `loraforge down` stops them")
    base_model = args.base_model or os.environ.get("LORAFORGE_BASE_MODEL") or DEFAULT_BASE_MODEL
    cluster = LocalCluster(home=home, base_model=base_model, workers=args.workers)
    if args.stall_timeout is not None:
        if args.stall_timeout <= 0:
            raise UsageError(f"--stall-timeout must be above 0 (got {args.stall_timeout})")
        cluster.stall_timeout = args.stall_timeout
    cluster.ports.update(_chosen_ports(args))
    for name in ("openai", "console"):
        port = getattr(args, f"{name}_port")
        if port is None:
            continue
        if not 0 <= port <= 65535:
            raise UsageError(f"--{name}-port must be 0 (any free port) to 65535 (got {port})")
        cluster.ports[name] = port
    start_cluster(
        cluster,
        "dataset, trainer, worker, predictor, the OpenAI-compatible API and the web console",
    )
    table = Table(title=f"loraforge services (home {escape(str(home))})")
    for col in ("service", "address", "pid", "log"):
        table.add_column(col)
    for name, proc in cluster.procs.items():
        table.add_row(
            name,
            f"127.0.0.1:{proc.port}" if proc.port else "-",
            str(proc.pid),
            escape(str(proc.log)),
        )
    console.print(table)
    moved = {s: a for s, a in cluster.addresses.items() if a != DEFAULT_ADDRESSES[s]}
    if moved:
        console.print(
            "other commands find them with "
            + " ".join(f"LORAFORGE_{s.upper()}_ADDRESS={a}" for s, a in moved.items())
            + " (or --dataset-address and the like)"
        )
    console.print(f"base model: {escape(base_model)}")
    console.print(f"OpenAI-compatible API: {cluster.openai_url} (`model` = a model's name)")
    console.print(f"web console: {cluster.console_url}")
    if cluster.auth:
        _print_key_hint(cluster.admin_key_file)
    else:
        console.print("API keys are off (LORAFORGE_AUTH=off): every local caller may do anything")
    console.print("stop them with `loraforge down`")


def _print_key_hint(admin_key: Path) -> None:
    """Where the admin key is and how the other commands find it."""
    if admin_key.resolve() == (default_home() / "admin.key").resolve():
        console.print(
            f"admin API key: {escape(str(admin_key))} (the other commands use it; "
            "`loraforge keys create` makes keys for one app)"
        )
    else:
        console.print(
            f"admin API key: {escape(str(admin_key))}; other commands find it with "
            f"LORAFORGE_API_KEY_FILE={escape(str(admin_key))} (or --api-key-file)"
        )


def cmd_down(args: argparse.Namespace) -> None:
    cluster = LocalCluster.attach(Path(args.home))
    if cluster is None:
        console.print("no services running")
        return
    cluster.stop()
    console.print("services stopped")


# ----- API keys ------------------------------------------------------------------------------

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_expiry(text: str) -> float:
    """Seconds from `90d`, `12h`, `30m`, `45s` or `2w`; 0 for `never`."""
    text = text.strip().lower()
    if text in ("never", "0", ""):
        return 0.0
    unit = _DURATION_UNITS.get(text[-1:])
    try:
        value = float(text[:-1]) if unit else float("nan")
    except ValueError:
        value = float("nan")
    if unit is None or not value > 0:
        raise UsageError(
            f"--expires {text!r}: expected a number and a unit (s, m, h, d, w), e.g. 90d, "
            "or `never`"
        )
    return value * unit


def _time(ts: Any, unset: str = "-") -> str:
    return f"{ts.ToDatetime():%Y-%m-%d %H:%M} UTC" if ts.seconds else unset


def _key_state(key: apb.ApiKey) -> str:
    if key.revoke_time.seconds:
        return "revoked"
    if key.expire_time.seconds and key.expire_time.ToDatetime() <= datetime.datetime.now(
        datetime.UTC
    ).replace(tzinfo=None):
        return "expired"
    return "active"


def cmd_keys(args: argparse.Namespace) -> None:
    client = _client(args)
    if args.action == "create":
        scopes = [s.strip() for s in (args.scopes or "").split(",") if s.strip()]
        if not scopes:
            raise UsageError(
                "name the key's scopes: --scopes read,write,train,predict with --app APP, "
                "or --scopes admin without --app"
            )
        key, secret = client.create_api_key(
            args.app or "",
            scopes,
            ttl_seconds=parse_expiry(args.expires),
            description=args.description or "",
        )
        owner = key.app or "every app (admin)"
        err_console.print(
            f"created {escape(key.name)} ({escape(key.prefix)}) for {escape(owner)}: "
            f"{', '.join(key.scopes)}; expires {_time(key.expire_time, 'never')}"
        )
        err_console.print("the key (shown only now, store it safely):")
        # Alone on stdout, so `KEY=$(loraforge keys create ...)` keeps just the key.
        print(secret, flush=True)
    elif args.action == "list":
        if args.id:
            raise UsageError("`keys list` takes no key id (filter with --app)")
        table = Table(
            "key", "prefix", "app", "scopes", "state", "created", "expires", "description"
        )
        for key in client.list_api_keys(args.app or "", show_inactive=args.all):
            table.add_row(
                escape(key.name),
                escape(key.prefix),
                escape(key.app) or "(admin)",
                ", ".join(key.scopes),
                _key_state(key),
                _time(key.create_time),
                _time(key.expire_time, "never"),
                _one_line(key.description),
            )
        console.print(table)
    else:
        revoked = client.revoke_api_key(_require(args.id, "key (apiKeys/ID, ID or lf_ID)"))
        console.print(f"revoked {escape(revoked.name)} ({escape(revoked.prefix)})")


def cmd_whoami(args: argparse.Namespace) -> None:
    principal = _client(args).whoami()
    table = Table(show_header=False, title=escape(principal.name))
    if principal.service:
        table.add_row("service", escape(principal.service))
    table.add_row("app", escape(principal.app) or "every app")
    table.add_row("scopes", ", ".join(principal.scopes) or "-")
    table.add_row("expires", _time(principal.expire_time, "never"))
    console.print(table)


# ----- apps, datasets, uploads, versions ------------------------------------------------------


def _require(value: str, what: str) -> str:
    if not value:
        raise UsageError(f"name the {what}")
    return value


def _print_resource(pb: dpb.App | dpb.Dataset) -> None:
    table = Table(show_header=False, title=escape(pb.name))
    table.add_row("description", escape(pb.description) or "-")
    table.add_row("created", f"{pb.create_time.ToDatetime():%Y-%m-%d %H:%M:%S} UTC")
    if isinstance(pb, dpb.Dataset):
        table.add_row("inputs", f"{pb.input_count:,}")
        table.add_row("versions", f"{pb.version_count:,}")
    table.add_row("etag", escape(pb.etag))
    console.print(table)


def cmd_apps(args: argparse.Namespace) -> None:
    client = _client(args)
    if args.action == "create":
        app = client.create_app(_require(args.id, "app"), description=args.description or "")
        console.print(f"created {escape(app.name)}")
    elif args.action == "delete":
        client.delete_app(_name(_require(args.id, "app"), "app"), force=args.force)
        console.print(f"deleted {escape(_name(args.id, 'app'))}")
    elif args.action == "show":
        _print_resource(client.app(_name(_require(args.id, "app"), "app")).pb)
    elif args.action == "update":
        if args.description is None:
            raise UsageError("nothing to change: pass --description TEXT")
        app = client.update_app(
            _name(_require(args.id, "app"), "app"), description=args.description, etag=args.etag
        )
        console.print(f"updated {escape(app.name)} (etag {escape(app.pb.etag)})")
    else:
        for app in client.list_apps():
            console.print(escape(app.name))


def cmd_datasets(args: argparse.Namespace) -> None:
    client = _client(args)
    if args.action == "create":
        name = _name(args.name, "app", "dataset")
        app_name, dataset_id = name.rsplit("/datasets/", 1)
        ds = client.app(app_name).create_dataset(dataset_id, description=args.description or "")
        console.print(f"created {escape(ds.name)}")
    elif args.action == "delete":
        name = _name(args.name, "app", "dataset")
        try:
            client.datasets.DeleteDataset(dpb.DeleteDatasetRequest(name=name, force=args.force))
        except grpc.RpcError as err:
            raise ClientError.from_rpc(err) from None
        console.print(f"deleted {escape(name)}")
    elif args.action == "show":
        _print_resource(client.dataset(_name(args.name, "app", "dataset")).pb)
    elif args.action == "update":
        if args.description is None:
            raise UsageError("nothing to change: pass --description TEXT")
        ds = client.update_dataset(
            _name(args.name, "app", "dataset"), description=args.description, etag=args.etag
        )
        console.print(f"updated {escape(ds.name)} (etag {escape(ds.pb.etag)})")
    else:
        table = Table("dataset", "inputs", "versions", "description")
        for ds in client.app(_name(args.name, "app")).list_datasets():
            table.add_row(
                escape(ds.name),
                f"{ds.pb.input_count:,}",
                f"{ds.pb.version_count:,}",
                _one_line(ds.pb.description),
            )
        console.print(table)


def cmd_upload(args: argparse.Namespace) -> None:
    client = _client(args)
    path = Path(args.file)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    name = _name(args.dataset, "app", "dataset")
    app_name, dataset_id = name.rsplit("/datasets/", 1)
    dataset = client.app(app_name).dataset(dataset_id)
    started = time.monotonic()
    with Progress(
        TextColumn("uploading"),
        BarColumn(),
        DownloadColumn(),
        TextColumn("{task.fields[rows]}"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("upload", total=path.stat().st_size, rows="")

        def progress(sent: int, total: int, lines: int) -> None:
            rate = lines / max(time.monotonic() - started, 1e-6)
            bar.update(task, completed=sent, rows=f"~{rate:,.0f} rows/s")

        report = dataset.upload_file(
            path,
            skip_duplicates=args.skip_duplicates,
            max_row_errors=args.max_errors,
            progress=progress,
            label_completions=args.label_completions,
            label_separator=args.label_separator,
        )
    elapsed = max(time.monotonic() - started, 1e-6)
    _print_upload_report(report, elapsed)


def _print_upload_report(report: dpb.UploadInputsResponse, elapsed: float) -> None:
    fmt = dpb.SourceFormat.Name(report.detected_format).removeprefix("SOURCE_FORMAT_").lower()
    console.print(
        f"format {fmt}: {report.rows_read:,} rows read, [green]{report.rows_accepted:,} accepted[/green], "
        f"[red]{report.rows_rejected:,} rejected[/red], {report.duplicate_rows:,} duplicates "
        f"({report.rows_read / elapsed:,.0f} rows/s, {report.bytes_read / elapsed / 1e6:.1f} MB/s)"
    )
    if report.row_errors:
        table = Table("line", "problem", "reason", "row starts with", title="rejected rows")
        for e in report.row_errors:
            table.add_row(str(e.line), escape(e.code), escape(e.reason), escape(e.excerpt[:60]))
        console.print(table)
        if report.row_errors_truncated:
            console.print(
                f"... and {report.rows_rejected - len(report.row_errors):,} more rejected rows"
            )


def cmd_versions(args: argparse.Namespace) -> None:
    client = _client(args)
    if args.action == "delete":
        name = _name(args.name, "app", "dataset", "version")
        try:
            client.datasets.DeleteDatasetVersion(dpb.DeleteDatasetVersionRequest(name=name))
        except grpc.RpcError as err:
            raise ClientError.from_rpc(err) from None
        console.print(f"deleted {escape(name)}")
        return
    name = _name(args.name, "app", "dataset")
    app_name, dataset_id = name.rsplit("/datasets/", 1)
    dataset = client.app(app_name).dataset(dataset_id)
    versions = (
        [dataset.create_version(args.id)] if args.action == "create" else dataset.list_versions()
    )
    table = Table(
        "version",
        "state",
        "code",
        "examples",
        "prompt chars (median/p95)",
        "completion chars (median/p95)",
    )
    for v in versions:
        s = v.stats
        table.add_row(
            escape(v.name),
            dpb.DatasetVersionState.Name(v.state).removeprefix("DATASET_VERSION_STATE_"),
            str(v.status_code),
            f"{s.example_count:,}",
            f"{s.prompt_chars.median}/{s.prompt_chars.p95}",
            f"{s.completion_chars.median}/{s.completion_chars.p95}",
        )
    console.print(table)
    for v in versions:
        if v.failure_reason:
            err_console.print(f"[red]{escape(v.name)}: {_one_line(v.failure_reason)}[/red]")


# ----- templates, models, training -----------------------------------------------------------


def cmd_base_models(args: argparse.Namespace) -> None:
    table = Table("base model", "architecture", "parameters", "context", "chat", "serving", "local")
    for m in _client(args).list_base_models():
        table.add_row(
            escape(m.model_id),
            escape(m.architecture),
            f"{m.parameter_count / 1e6:.0f}M",
            str(m.context_length),
            "yes" if m.chat_template else "no",
            escape(m.serving_engine),
            escape(m.local_source),
        )
    console.print(table)


def cmd_templates(args: argparse.Namespace) -> None:
    client = _client(args)
    if args.action == "list":
        table = Table("template", "recommended", "serving", "hardware")
        for t in client.list_templates():
            table.add_row(
                escape(t.name.removeprefix("templates/")),
                "yes" if t.recommended else "",
                escape(t.serving_engine),
                escape(t.hardware.summary),
            )
        console.print(table)
        return
    template = client.get_template(_require(args.name, "template (see `loraforge templates list`)"))
    table = Table(
        "parameter", "type", "default", "bounds", "description", title=escape(template.name)
    )
    for p in template.parameters:
        bounds = ", ".join(
            x
            for x in (
                f"≥ {p.min:g}" if p.HasField("min") else "",
                f"≤ {p.max:g}" if p.HasField("max") else "",
                "one of " + "/".join(p.choices) if p.choices else "",
            )
            if x
        )
        default = json.dumps(parameter_default(p)) if p.HasField("default_value") else ""
        table.add_row(
            escape(p.path),
            tpb.ParameterType.Name(p.type).removeprefix("PARAMETER_TYPE_").lower(),
            escape(default),
            escape(bounds),
            escape(p.description),
        )
    console.print(table)
    if args.save_params:
        doc = {
            "template": template.name.removeprefix("templates/"),
            "dataset_version": "",
            **template_defaults(template),
        }
        Path(args.save_params).write_text(yaml.safe_dump(doc, sort_keys=False))
        console.print(
            f"parameters written to {escape(args.save_params)}; edit them and pass --params to "
            "`loraforge train`"
        )


def cmd_models(args: argparse.Namespace) -> None:
    client = _client(args)
    if args.action == "create":
        name = _name(args.name, "app", "model")
        app_name, model_id = name.rsplit("/models/", 1)
        model = client.app(app_name).create_model(model_id, description=args.description or "")
        console.print(f"created {escape(model.name)}")
    elif args.action == "delete":
        name = _name(args.name, "app", "model")
        try:
            client.trainer.DeleteModel(tpb.DeleteModelRequest(name=name, force=args.force))
        except grpc.RpcError as err:
            raise ClientError.from_rpc(err) from None
        console.print(f"deleted {escape(name)}")
    elif args.action == "show":
        _print_model(client.model(_name(args.name, "app", "model")).pb)
    elif args.action == "update":
        defaults = _parse_inference_params(args.inference_param)
        if args.clear_inference_params:
            if defaults:
                raise UsageError("pass --inference-param or --clear-inference-params, not both")
            defaults = {}
        if args.description is None and args.notes is None and defaults is None:
            raise UsageError(
                "nothing to change: pass --description TEXT, --notes TEXT, "
                "--inference-param KEY=VALUE or --clear-inference-params"
            )
        model = client.update_model(
            _name(args.name, "app", "model"),
            description=args.description,
            notes=args.notes,
            default_inference_params=defaults,
            etag=args.etag,
        )
        console.print(f"updated {escape(model.name)} (etag {escape(model.pb.etag)})")
    else:
        table = Table("model", "latest trained version")
        for m in client.app(_name(args.name, "app")).list_models():
            table.add_row(escape(m.name), escape(m.pb.latest_trained_version) or "-")
        console.print(table)


def _print_model(pb: tpb.Model) -> None:
    table = Table(show_header=False, title=escape(pb.name))
    table.add_row("description", escape(pb.description) or "-")
    table.add_row("notes", escape(pb.notes) or "-")
    table.add_row("latest trained version", escape(pb.latest_trained_version) or "-")
    defaults = json_format.MessageToDict(
        pb.default_inference_params, preserving_proto_field_name=True
    )
    table.add_row(
        "default inference parameters",
        escape(", ".join(f"{k}={v}" for k, v in sorted(defaults.items()))) or "-",
    )
    table.add_row("created", f"{pb.create_time.ToDatetime():%Y-%m-%d %H:%M:%S} UTC")
    table.add_row("etag", escape(pb.etag))
    console.print(table)


_TEXT_INFERENCE_PARAMS = ("system_prompt", "prompt_template", "prompt_format")


def _parse_inference_params(items: Sequence[str]) -> dict[str, Any] | None:
    """`--inference-param temperature=0.7 --inference-param stop=END` as a dict; None: none given."""
    if not items:
        return None
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UsageError(
                f"--inference-param {item!r}: expected KEY=VALUE, e.g. temperature=0.7"
            )
        if key == "stop":
            out.setdefault("stop", []).append(raw)
        elif key in _TEXT_INFERENCE_PARAMS:
            out[key] = raw  # the text as it is: `# Title` is no YAML comment here
        else:
            try:
                out[key] = load_yaml(raw) if raw else raw
            except yaml.YAMLError:
                out[key] = raw  # not YAML (an unbalanced quote, say): the text as it is
    return out


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--set {item!r}: expected group.key=value, e.g. peft_config.r=8")
        path, raw = item.split("=", 1)
        node = out
        *groups, leaf = path.split(".")
        for g in groups:
            node = node.setdefault(g, {})
        try:
            node[leaf] = load_yaml(raw)
        except yaml.YAMLError:
            node[leaf] = raw  # not YAML (an unbalanced quote, say): the text as it is
    return out


def _parse_sweep(items: Sequence[str]) -> dict[str, list[Any]]:
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or not raw.strip():
            raise UsageError(
                f"--sweep {item!r}: expected KEY=VALUE1,VALUE2, e.g. learning_rate=1e-4,3e-4"
            )
        values: list[Any] = []
        for text in raw.split(","):
            try:
                values.append(load_yaml(text.strip()) if text.strip() else None)
            except yaml.YAMLError:
                values.append(text.strip())
        if key.strip() in grid:
            raise UsageError(f"--sweep {key.strip()}: given twice; list its values once")
        grid[key.strip()] = values
    return grid


def _sweep(model: Model, args: argparse.Namespace) -> None:
    """Trains one version per combination, scores each on the held-out dataset version,
    prints the table and marks the best as the model's best version."""
    if not args.eval_dataset_version:
        raise UsageError("--sweep needs --eval-dataset-version: the held-out data it scores on")
    for flag, value in (("--id", args.id), ("--from-version", args.from_version)):
        if value:
            raise UsageError(f"{flag} does not go with --sweep: each candidate is a new run")
    if args.estimate or args.request_id:
        raise UsageError("--estimate and --request-id do not go with --sweep")
    grid = _parse_sweep(args.sweep)
    seen: dict[int, tuple[str, float | None]] = {}

    def show(candidates: list[SweepCandidate]) -> None:
        done = sum(c.state in ("TRAINED", "FAILED", "CANCELLED") for c in candidates)
        for i, c in enumerate(candidates):
            now = (c.state, c.score)
            if seen.get(i) == now:
                continue
            seen[i] = now
            what = " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in c.params.items())
            said = f"score {c.score:.4g}" if c.score is not None else c.state
            if c.failure_reason and c.score is None:
                said += f": {_one_line(c.failure_reason)}"
            where = "scored" if c.score is not None else f"{done}/{len(candidates)} ended"
            console.print(f"[{where}] {escape(what)}: {escape(said)}", highlight=False)

    result = model.sweep(
        grid,
        args.eval_dataset_version,
        metrics=args.metric,
        inference_params={"max_tokens": args.eval_max_tokens} if args.eval_max_tokens else None,
        progress=show,
    )
    paths = list(result.candidates[0].params) if result.candidates else []
    table = Table(
        "version",
        *(escape(p.rsplit(".", 1)[-1]) for p in paths),
        "state",
        escape(result.primary_score or "score"),
        "best",
        title=f"sweep of {escape(model.name)}",
    )
    for c in result.candidates:
        table.add_row(
            escape(c.version.rsplit("/", 1)[-1]),
            *(escape(str(c.params[p])) for p in paths),
            c.state,
            f"{c.score:.4g}" if c.score is not None else "-",
            "*" if c is result.best else "",
        )
    console.print(table)
    if result.best is None:
        raise RunEnded("no candidate was trained and scored; the table says how each ended")
    console.print(f"best version of {escape(model.name)}: {escape(result.best.version)}")


def cmd_train(args: argparse.Namespace) -> None:
    client = _client(args)
    name = _name(args.model, "app", "model")
    app_name, model_id = name.rsplit("/models/", 1)
    model = client.app(app_name).model(model_id)
    params: dict[str, Any] = {}
    if args.params:
        path = Path(args.params)
        if not path.is_file():
            raise UsageError(f"--params {path}: no such file")
        try:
            params = load_yaml(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UsageError(f"--params {path}: not valid YAML ({_one_line(str(exc))})") from None
        if not isinstance(params, dict):
            raise UsageError(f"--params {path}: expected a YAML mapping of parameter groups")
    template = args.template or params.get("template")
    if not template and args.from_version:
        version = args.from_version.partition("@")[0].split("/checkpoints/")[0]
        template = client.model_version(version).template
    if not template:
        raise UsageError(
            "no template: pass --template NAME (see `loraforge templates list`) or a --params file"
        )
    model.get_params(template)
    dataset_version = args.dataset_version or params.get("dataset_version")
    if not dataset_version:
        raise UsageError(
            "no dataset version: pass --dataset-version apps/APP/datasets/DATASET/versions/VERSION"
        )
    params.pop("template", None)
    params["dataset_version"] = dataset_version
    merge(params, _parse_set(args.set))
    model.update_params(**params)
    if args.sweep:
        _sweep(model, args)
        return
    if args.eval_dataset_version or args.metric or args.eval_max_tokens:
        raise UsageError("--eval-dataset-version, --metric and --eval-max-tokens are for --sweep")
    if args.estimate:
        print_estimate(model.estimate(from_model_version=args.from_version))
        return
    version_id = model.train(
        version_id=args.id, request_id=args.request_id, from_model_version=args.from_version
    )
    version_name = model.version_name(version_id)
    console.print(f"queued {escape(version_name)}")
    if args.no_watch:
        return
    follow(client, version_name, plot=args.plot)


def print_estimate(e: tpb.EstimateModelVersionResponse) -> None:
    """The estimate as a table: what `train --estimate` and the demo print."""
    table = Table(show_header=False, title="estimate (nothing queued)")
    table.add_row("examples", f"{e.examples_kept:,} of {e.examples_total:,} kept")
    if e.examples_truncated:
        table.add_row("truncated", f"{e.examples_truncated:,} cut to model_max_length")
    for code, count in sorted(e.dropped_by_code.items()):
        table.add_row("dropped", f"{count:,} {escape(code)}")
    table.add_row("split", f"{e.train_examples:,} train, {e.eval_examples:,} eval")
    table.add_row("steps", f"{e.steps:,} ({e.epochs:.2f} epochs)")
    table.add_row("tokens", f"{e.total_tokens:,} ({e.tokens_per_epoch:,} per epoch)")
    if e.HasField("estimated_time"):
        table.add_row(
            "time",
            f"{_duration(e.estimated_time.ToTimedelta().total_seconds())} "
            f"(at {e.tokens_per_second:,.0f} tokens/s)",
        )
    table.add_row("calibration", escape(e.calibration))
    table.add_row(
        "peak memory",
        f"{e.estimated_peak_memory_bytes / 2**30:.2f} GiB on a {e.worker_kind} worker",
    )
    console.print(table)
    for d in e.dropped[:10]:
        console.print(f"  {escape(d.code)}: {escape(d.reason)}", highlight=False)


@dataclass
class LossCurve:
    """Each loss at the step it was measured.

    Every progress event carries the latest train and eval loss, so a value is new only
    where it differs from the last one recorded: an eval loss repeated by later training
    steps is not a measurement, and plotting it would draw stale flat points.
    """

    train: list[tuple[int, float]] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)

    def add(self, p: tpb.TrainingProgress) -> None:
        if p.HasField("train_loss") and (not self.train or self.train[-1][1] != p.train_loss):
            self.train.append((p.step, p.train_loss))
        if p.HasField("eval_loss") and (not self.evals or self.evals[-1][1] != p.eval_loss):
            self.evals.append((p.step, p.eval_loss))


def log_line(event: tpb.TrainingEvent) -> str | None:
    """What a live view shows of a log event: a warning's first line, escaped; else nothing.

    Errors are left to the run's final status, which names the cause in one line (an
    error log holds the worker's traceback; `loraforge logs` shows it).
    """
    if event.WhichOneof("kind") != "log" or event.log.level != tpb.LOG_LEVEL_WARNING:
        return None
    lines = [line for line in event.log.message.splitlines() if line.strip()]
    if not lines:
        return None
    return escape(lines[0].strip()) + (" …" if len(lines) > 1 else "")


def _full_version_name(name: str) -> str:
    try:
        return full_version_name(name)
    except ClientError as exc:
        raise UsageError(exc.message) from None


def _duration(seconds: float) -> str:
    hours, rest = divmod(max(round(seconds), 0), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


def _state_name(state: tpb.ModelVersionState.ValueType) -> str:
    return tpb.ModelVersionState.Name(state).removeprefix("MODEL_VERSION_STATE_")


def follow(client: Client, version_name: str, plot: str | None = None) -> tpb.ModelVersion:
    """Shows a run's live progress from its watch stream; saves the loss curve as a PNG.

    RunEnded when the run ends FAILED or CANCELLED, naming the cause in one line.
    """
    version_name = _full_version_name(version_name)
    curve = LossCurve()
    last_message = ""
    with Progress(
        TextColumn("[bold]{task.fields[state]}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[steps]}"),
        TextColumn("{task.fields[stats]}"),
        TimeRemainingColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("train", total=None, state="QUEUED", stats="", steps="")
        for event in client.watch(version_name):
            kind = event.WhichOneof("kind")
            if kind == "state_change":
                change = event.state_change
                bar.update(task, state=f"{_state_name(change.state)} ({change.status_code})")
                last_message = change.message or last_message
            elif kind == "progress":
                p = event.progress
                curve.add(p)
                stats = [f"{p.tokens_per_second:,.0f} tok/s"]
                if curve.train:
                    stats.insert(0, f"loss {curve.train[-1][1]:.3f}")
                if curve.evals:
                    stats.insert(1, f"eval {curve.evals[-1][1]:.3f}")
                bar.update(
                    task, total=p.total_steps or None, completed=p.step, stats="  ".join(stats)
                )
            elif (line := log_line(event)) is not None:
                bar.console.print(f"[yellow]{line}[/yellow]")
    version = client.model_version(version_name)
    state = _state_name(version.state)
    if curve.train and plot != "":
        path = plot or f"loss-{version_name.rsplit('/', 1)[-1]}.png"
        save_loss_curve(curve.train, curve.evals, path, version_name)
        console.print(f"loss curve saved to {escape(path)}")
    if version.state in (tpb.MODEL_VERSION_STATE_FAILED, tpb.MODEL_VERSION_STATE_CANCELLED):
        cause = version.failure_reason or last_message or state.lower()
        raise RunEnded(
            f"{escape(version_name)} {state} ({version.status_code}): {_one_line(cause)}"
            + (
                f" (the whole log: `loraforge logs {escape(version_name)}`)"
                if state == "FAILED"
                else ""
            )
        )
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in sorted(version.metrics.items()))
    console.print(
        f"{escape(version_name)}: {state} ({version.status_code})"
        + (f" — {escape(metrics)}" if metrics else "")
    )
    return version


def save_loss_curve(
    train: list[tuple[int, float]], evals: list[tuple[int, float]], path: str, title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cmd_status(args: argparse.Namespace) -> None:
    client = _client(args)
    mv = client.model_version(args.version)
    table = Table(show_header=False, title=escape(mv.name))
    table.add_row("state", f"{_state_name(mv.state)} ({mv.status_code})")
    if mv.status_message:
        table.add_row("status", escape(mv.status_message))
    table.add_row("template", escape(mv.template))
    table.add_row("dataset version", escape(mv.dataset_version))
    p = mv.progress
    if p.total_steps:
        table.add_row("progress", f"step {p.step}/{p.total_steps}, epoch {p.epoch:.2f}")
        if p.HasField("train_loss"):
            table.add_row("train loss", f"{p.train_loss:.4f}")
        if p.HasField("eval_loss"):
            table.add_row("eval loss", f"{p.eval_loss:.4f}")
        if p.learning_rate:
            table.add_row("learning rate", f"{p.learning_rate:.3g}")
        if p.tokens_per_second:
            table.add_row("throughput", f"{p.tokens_per_second:,.0f} tokens/s")
        if mv.state == tpb.MODEL_VERSION_STATE_TRAINING and p.HasField("eta"):
            table.add_row("time left", _duration(p.eta.ToTimedelta().total_seconds()))
    for k, v in sorted(mv.metrics.items()):
        table.add_row(escape(k), f"{v:.4g}")
    if mv.failure_reason:
        table.add_row("failure", escape(mv.failure_reason))
    if mv.artifacts.adapter_prefix:
        table.add_row("adapter", escape(mv.artifacts.adapter_prefix))
    console.print(table)


def cmd_logs(args: argparse.Namespace) -> None:
    client = _client(args)
    for event in client.logs(args.version):
        if event.WhichOneof("kind") == "log":
            level = tpb.LogLevel.Name(event.log.level).removeprefix("LOG_LEVEL_")
            console.print(
                f"{event.time.ToDatetime():%H:%M:%S} {level:7} {event.log.message}",
                markup=False,
                highlight=False,
            )


def cmd_watch(args: argparse.Namespace) -> None:
    follow(_client(args), args.version, plot=args.plot)


def cmd_cancel(args: argparse.Namespace) -> None:
    mv = _client(args).cancel(args.version)
    console.print(f"{escape(mv.name)}: {_state_name(mv.state)}")


def cmd_checkpoints(args: argparse.Namespace) -> None:
    found = _client(args).checkpoints(args.version)
    table = Table("step", "epoch", "train loss", "eval loss", "saved", "name")
    for c in found:
        table.add_row(
            str(c.step),
            f"{c.epoch:.2f}",
            f"{c.train_loss:.4f}" if c.HasField("train_loss") else "",
            f"{c.eval_loss:.4f}" if c.HasField("eval_loss") else "",
            f"{c.create_time.ToDatetime():%Y-%m-%d %H:%M:%S}",
            escape(c.name),
        )
    console.print(table if found else "no checkpoints")


def cmd_export(args: argparse.Namespace) -> None:
    client = _client(args)
    dest = Path(args.output) if args.output else Path.cwd()
    if not dest.is_dir() and not dest.parent.is_dir():
        raise UsageError(f"{dest.parent}: no such folder")
    what = "merging the adapter into the base model" if args.merged else "exporting"
    with Progress(
        TextColumn(what),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("export", total=None)

        def progress(received: int, total: int) -> None:
            bar.update(task, completed=received, total=total, description="downloading")

        path, info = client.export(args.version, dest, merged=args.merged, progress=progress)
    kind = "merged model" if args.merged else "adapter"
    console.print(
        f"wrote the {kind} of {escape(str(info.manifest['model_version']))} to {escape(str(path))} "
        f"({info.size_bytes:,} bytes, sha256 {info.sha256[:12]}…): "
        + ", ".join(escape(f.rsplit("/", 1)[-1]) for f in info.files)
    )


def _scores_line(scores: Any) -> str:
    return ", ".join(f"{k} {v:.3g}" for k, v in sorted(scores.items())) or "-"


def _evaluation_state(evaluation: epb.Evaluation) -> str:
    return epb.EvaluationState.Name(evaluation.state).removeprefix("EVALUATION_STATE_")


def _print_evaluation(evaluation: epb.Evaluation) -> None:
    table = Table(show_header=False, title=escape(evaluation.name))
    table.add_row("state", _evaluation_state(evaluation))
    who = "base model" if evaluation.base_model else escape(evaluation.model_version)
    if evaluation.base_model_name:
        who += f" ({escape(evaluation.base_model_name)})"
    table.add_row("model", who)
    if evaluation.prompt_like:
        table.add_row("prompted like", escape(evaluation.prompt_like))
    table.add_row("dataset version", escape(evaluation.dataset_version))
    table.add_row("metrics", ", ".join(evaluation.metrics) or "(defaults)")
    if evaluation.label_aliases:
        aliases = ", ".join(f"{a}={b}" for a, b in sorted(evaluation.label_aliases.items()))
        table.add_row("label aliases", escape(aliases))
    p = evaluation.progress
    table.add_row("progress", f"{p.completed_examples}/{p.total_examples or '?'} examples")
    for name, value in sorted(evaluation.scores.items()):
        table.add_row(escape(name), f"{value:.4g}")
    for warning in evaluation.warnings:
        table.add_row("warning", escape(warning))
    if evaluation.failure_reason:
        table.add_row("failure", escape(evaluation.failure_reason))
    console.print(table)
    matrix = evaluation.confusion_matrix
    if matrix.labels:
        counts = {(c.reference, c.predicted): c.count for c in matrix.cells}
        grid = Table("reference \\ answer", *(escape(label) for label in matrix.labels))
        grid.title = "label accuracy: confusion matrix"
        for ref in matrix.labels:
            if any(r == ref for r, _ in counts):
                grid.add_row(escape(ref), *(str(counts.get((ref, a), "")) for a in matrix.labels))
        console.print(grid)


def _clip(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return escape(flat if len(flat) <= width else flat[: width - 1] + "…")


def _parse_label_aliases(pairs: list[str]) -> dict[str, str]:
    aliases: dict[str, str] = {}
    for pair in pairs:
        alias, sep, label = pair.partition("=")
        if not sep or not alias.strip() or not label.strip():
            raise UsageError(f"--label-alias {pair!r}: write ALIAS=LABEL, e.g. neg=negative")
        aliases[alias.strip()] = label.strip()
    return aliases


def cmd_eval(args: argparse.Namespace) -> None:
    client = _client(args)
    if args.eval_command == "create":
        params: dict[str, Any] = _parse_inference_params(args.inference_param) or {}
        if args.max_tokens is not None:
            params["max_tokens"] = args.max_tokens
        prompt_like = "" if args.prompt_like == "none" else args.prompt_like
        if args.base:
            target = model_name(args.target)
            if "/versions/" in target:
                raise UsageError("with --base, name the model (APP/MODEL), not a version")
            if not args.prompt_like:  # compare like with like: the prompts training used
                prompt_like = client.model(target).pb.latest_trained_version
                if not prompt_like:
                    console.print(
                        f"{escape(target)} has no trained version to prompt the base model "
                        "like: its prompts go to it as they are, with no chat template or "
                        "system prompt (name a version with --prompt-like to choose)",
                        highlight=False,
                    )
            if prompt_like:
                console.print(
                    f"the base model is prompted like {escape(prompt_like)}: its prompt "
                    "format and system prompt",
                    highlight=False,
                )
        else:
            target = full_version_name(args.target)
        evaluation = client.create_evaluation(
            target,
            args.dataset_version,
            metrics=args.metric,
            inference_params=params or None,
            max_examples=args.max_examples,
            prompt_like=prompt_like,
            evaluation_id=args.id,
            label_aliases=_parse_label_aliases(args.label_alias),
        )
        console.print(f"evaluating: {escape(evaluation.name)}")
        if args.no_wait:
            return
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            console=console,
            transient=True,
        ) as bar:
            task = bar.add_task("examples", total=None)
            for update in client.watch_evaluation(evaluation.name):
                p = update.progress
                bar.update(task, completed=p.completed_examples, total=p.total_examples or None)
                evaluation = update
        _print_evaluation(evaluation)
        if evaluation.state != epb.EVALUATION_STATE_SUCCEEDED:
            why = f": {evaluation.failure_reason}" if evaluation.failure_reason else ""
            raise RunEnded(escape(f"{evaluation.name} {_evaluation_state(evaluation)}{why}"))
    elif args.eval_command == "show":
        _print_evaluation(client.evaluation(args.evaluation))
    elif args.eval_command == "cancel":
        cancelled = client.cancel_evaluation(args.evaluation)
        console.print(f"{escape(cancelled.name)}: {_evaluation_state(cancelled)}")
    elif args.eval_command == "list":
        table = Table("evaluation", "state", "dataset version", "scores")
        for e in client.list_evaluations(args.target):
            table.add_row(
                escape(e.name.rsplit("/", 1)[-1]),
                _evaluation_state(e),
                escape(e.dataset_version),
                escape(_scores_line(e.scores)),
            )
        console.print(table)
    elif args.eval_command == "results":
        order_by = args.order_by or ("score" if args.worst else "")
        results = client.evaluation_results(args.evaluation, order_by=order_by, limit=args.limit)
        names = sorted({k for r in results for k in r.scores})
        table = Table("#", "prompt", "reference", "output", *names)
        for r in results:
            table.add_row(
                str(r.index),
                _clip(r.prompt, 40),
                _clip(r.reference, 24),
                _clip(r.output, 24),
                *(f"{r.scores[n]:.3g}" if n in r.scores else "" for n in names),
            )
        console.print(table)
    elif args.eval_command == "compare":
        comparison = client.compare_evaluations(args.evaluation, args.other, score=args.score)
        summary = Table("", escape(args.evaluation), escape(args.other))
        for name in sorted(set(comparison.scores) | set(comparison.other_scores)):
            summary.add_row(
                escape(name),
                f"{comparison.scores.get(name, 0.0):.4g}",
                f"{comparison.other_scores.get(name, 0.0):.4g}",
            )
        console.print(summary)
        console.print(
            f"by {comparison.score}: {comparison.better_count} better, "
            f"{comparison.worse_count} worse, {comparison.unchanged_count} unchanged"
        )
        changes = comparison.changes[: args.limit] if args.limit else comparison.changes
        if changes:
            table = Table("#", "change", "prompt", "reference", "before", "after", "score")
            for c in changes:
                table.add_row(
                    str(c.index),
                    "better" if c.change == epb.CHANGE_BETTER else "worse",
                    _clip(c.prompt, 36),
                    _clip(c.reference, 20),
                    _clip(c.output, 20),
                    _clip(c.other_output, 20),
                    f"{c.score:.3g} → {c.other_score:.3g}",
                )
            console.print(table)


def cmd_predict(args: argparse.Namespace) -> None:
    client = _client(args)
    if bool(args.model) == args.base:
        raise UsageError(
            "name a model (APP/MODEL, APP/MODEL/VERSION or a full name) or pass --base, not both"
        )
    # Unset parameters take the predictor's defaults, the same for every client.
    params: dict[str, Any] = {"temperature": args.temperature}
    if args.max_tokens is not None:
        params["maxTokens"] = args.max_tokens
    if args.system_prompt:
        params["systemPrompt"] = args.system_prompt
    if args.prompt_template:
        params["promptTemplate"] = args.prompt_template
    model = model_name(args.model)
    if args.no_stream:
        out = client.predict(
            [args.text], model, base_model=args.base, inference_params=params
        ).outputs[0]
        console.print(out.data.text.raw, markup=False, highlight=False)
        return
    last = None
    for msg in client.predict_stream(
        args.text, model, base_model=args.base, inference_params=params
    ):
        sys.stdout.write(msg.delta)
        sys.stdout.flush()
        last = msg
    sys.stdout.write("\n")
    if last is not None:
        finish = ppb.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
        err_console.print(
            f"[dim]{last.prompt_tokens} prompt + {last.completion_tokens} completion tokens, "
            f"finished: {finish}[/dim]"
        )


def cmd_demo(args: argparse.Namespace) -> None:
    from loraforge.client.demo import run_demo

    run_demo(
        home=Path(args.home) / "demo",
        base_model=args.base_model,
        keep_running=args.keep_running,
        epochs=args.epochs,
    )


# ----- parser ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraforge",
        description="Fine-tune text-to-text LLMs with LoRA and serve the adapters.",
    )
    parser.add_argument(
        "--dataset-address",
        default=None,
        help="dataset service host:port [env LORAFORGE_DATASET_ADDRESS; 127.0.0.1:50051]",
    )
    parser.add_argument(
        "--trainer-address",
        default=None,
        help="trainer service host:port [env LORAFORGE_TRAINER_ADDRESS; 127.0.0.1:50052]",
    )
    parser.add_argument(
        "--predictor-address",
        default=None,
        help="predictor service host:port [env LORAFORGE_PREDICTOR_ADDRESS; 127.0.0.1:50053]",
    )
    parser.add_argument(
        "--api-key",
        default=None,
        help="API key every call carries [env LORAFORGE_API_KEY; else LORAFORGE_API_KEY_FILE; "
        "else ~/.loraforge/admin.key (LORAFORGE_HOME/admin.key) if it exists]",
    )
    parser.add_argument(
        "--api-key-file", default=None, help="file holding the API key (instead of --api-key)"
    )
    parser.add_argument(
        "--tls-ca-file",
        default=None,
        help="CA bundle (PEM) that verifies the services; set, the calls use TLS "
        "[env LORAFORGE_TLS_CA_FILE]",
    )
    parser.add_argument(
        "--tls-client-cert-file",
        default=None,
        help="client certificate (PEM), for services that verify clients "
        "[env LORAFORGE_TLS_CLIENT_CERT_FILE]",
    )
    parser.add_argument(
        "--tls-client-key-file",
        default=None,
        help="private key (PEM) of the client certificate [env LORAFORGE_TLS_CLIENT_KEY_FILE]",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Any, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(fn=fn)
        return p

    p = add(
        "up",
        cmd_up,
        "start dataset, trainer, a worker, the predictor and the OpenAI-compatible API here",
    )
    p.add_argument(
        "--home", default=str(default_home()), help="state folder (SQLite, objects, logs)"
    )
    p.add_argument(
        "--base-model",
        default=None,
        help="base model the predictor serves (catalogue name, hub id or folder); "
        f"default: {DEFAULT_BASE_MODEL}",
    )
    p.add_argument("--workers", type=int, default=1, help="training worker processes")
    p.add_argument(
        "--base-port",
        type=int,
        default=None,
        help="the dataset, trainer and predictor listen on this port and the two after it",
    )
    for name, address in DEFAULT_ADDRESSES.items():
        p.add_argument(
            f"--{name}-port",
            type=int,
            default=None,
            help=f"port of the {name} service (0: any free one); default {address.rsplit(':')[1]}",
        )
    p.add_argument(
        "--openai-port",
        type=int,
        default=None,
        help=f"port of the OpenAI-compatible HTTP API (0: any free one); default {OPENAI_PORT}",
    )
    p.add_argument(
        "--console-port",
        type=int,
        default=None,
        help=f"port of the web console (0: any free one); default {CONSOLE_PORT}",
    )
    p.add_argument(
        "--stall-timeout",
        type=float,
        default=None,
        help="seconds a starting service may go without reporting progress before `up` "
        "gives up (a slow start that keeps reporting never fails) "
        "[env LORAFORGE_START_STALL_SECONDS; 600]",
    )
    p = add("down", cmd_down, "stop the services `up` started")
    p.add_argument("--home", default=str(default_home()))
    p = add(
        "demo",
        cmd_demo,
        "the end-to-end demo: upload, version, train, predict (base vs fine-tuned)",
    )
    p.add_argument(
        "--home", default=str(default_home()), help="its state goes in HOME/demo (wiped at start)"
    )
    p.add_argument(
        "--base-model",
        default=None,
        help=f"base model (catalogue name, hub id or folder); default: {DEFAULT_BASE_MODEL}",
    )
    p.add_argument("--epochs", type=float, default=1, help="training epochs")
    p.add_argument(
        "--keep-running", action="store_true", help="leave the services running afterwards"
    )

    p = add("keys", cmd_keys, "create, list or revoke API keys (admin)")
    p.add_argument("action", choices=["create", "list", "revoke"])
    p.add_argument("id", nargs="?", default="", help="the key to revoke: apiKeys/ID, ID or lf_ID")
    p.add_argument("--app", default=None, help="the key's app (create); only its keys (list)")
    p.add_argument(
        "--scopes",
        default=None,
        help="create: comma-separated, some of read, write, train, predict (with --app), "
        "or admin (without)",
    )
    p.add_argument(
        "--expires",
        default="never",
        help="create: how long the key works, e.g. 90d, 12h, 2w (default never)",
    )
    p.add_argument("--description", default=None, help="create: what the key is for")
    p.add_argument("--all", action="store_true", help="list: revoked and expired keys too")
    add("whoami", cmd_whoami, "show who the API key in use is and what it may do")
    p = add("apps", cmd_apps, "create, list, show, update or delete apps")
    p.add_argument("action", choices=["create", "list", "show", "update", "delete"])
    p.add_argument("id", nargs="?", default="", help="the app (all but list)")
    p.add_argument("--description", default=None, help="description (create, update)")
    p.add_argument(
        "--etag",
        default="",
        help="update only if the app still has this etag (from `apps show`)",
    )
    p.add_argument("--force", action="store_true", help="delete with datasets")
    p = add("datasets", cmd_datasets, "create, list, show, update or delete datasets")
    p.add_argument("action", choices=["create", "list", "show", "update", "delete"])
    p.add_argument("name", help="APP/DATASET, or APP for list")
    p.add_argument("--description", default=None, help="description (create, update)")
    p.add_argument(
        "--etag",
        default="",
        help="update only if the dataset still has this etag (from `datasets show`)",
    )
    p.add_argument("--force", action="store_true")
    p = add("upload", cmd_upload, "upload a file of examples (CSV, JSONL or text) to a dataset")
    p.add_argument("dataset", help="APP/DATASET or apps/APP/datasets/DATASET")
    p.add_argument("file")
    p.add_argument("--skip-duplicates", action="store_true")
    p.add_argument("--max-errors", type=int, default=50, help="rejected rows to list")
    p.add_argument(
        "--label-completions",
        metavar="TEMPLATE",
        default=None,
        help="read a labelled CSV (input,concepts): each row's concepts become its completion "
        "and its input goes into TEMPLATE at {input}, e.g. 'Classify this review: {input}'",
    )
    p.add_argument(
        "--label-separator",
        default="",
        help="joins a row's concepts in its completion (with --label-completions; default ', ')",
    )
    p = add("versions", cmd_versions, "create or list dataset versions, or delete one")
    p.add_argument("action", choices=["create", "list", "delete"])
    p.add_argument("name", help="APP/DATASET (create, list) or APP/DATASET/VERSION (delete)")
    p.add_argument("--id", default="", help="version id (create); generated when empty")
    add("base-models", cmd_base_models, "list the base models templates can name")
    p = add("templates", cmd_templates, "list templates or show one's parameters")
    p.add_argument("action", choices=["list", "show"])
    p.add_argument("name", nargs="?", default="")
    p.add_argument("--save-params", default=None, help="write the parameters as YAML (show)")
    p = add("models", cmd_models, "create, list, show, update or delete models")
    p.add_argument("action", choices=["create", "list", "show", "update", "delete"])
    p.add_argument("name", help="APP/MODEL, or APP for list")
    p.add_argument("--description", default=None, help="description (create, update)")
    p.add_argument("--notes", default=None, help="notes: longer text about the model (update)")
    p.add_argument(
        "--inference-param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a default inference parameter, e.g. temperature=0.7 (update; replaces the "
        "defaults; repeat it, and `stop` for each stop string)",
    )
    p.add_argument(
        "--clear-inference-params",
        action="store_true",
        help="remove the default inference parameters (update)",
    )
    p.add_argument(
        "--etag",
        default="",
        help="update only if the model still has this etag (from `models show`)",
    )
    p.add_argument("--force", action="store_true")
    p = add("train", cmd_train, "train a new model version and follow its progress")
    p.add_argument("model", help="APP/MODEL or apps/APP/models/MODEL")
    p.add_argument("--template", default=None)
    p.add_argument("--dataset-version", default=None)
    p.add_argument("--params", default=None, help="YAML written by `templates show --save-params`")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="GROUP.KEY=VALUE",
        help="override one parameter",
    )
    p.add_argument("--id", default="", help="version id; generated when empty")
    p.add_argument(
        "--request-id",
        default=None,
        help="queue one run per id: running the command again with it returns that run",
    )
    p.add_argument("--no-watch", action="store_true", help="return once queued")
    p.add_argument(
        "--estimate",
        action="store_true",
        help="print what the run would train on, its steps, time and memory; queue nothing",
    )
    p.add_argument(
        "--from-version",
        default="",
        metavar="APP/MODEL/VERSION[@STEP]",
        help="continue training from this trained version's adapter, or its checkpoint at STEP "
        "(same base model and LoRA shape), with its parameters changed by --set and --params",
    )
    p.add_argument("--plot", default=None, help="loss curve PNG path (default loss-VERSION.png)")
    p.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="train one version per combination of the values (repeat for more keys; a key is "
        "a parameter path, trainer_config.learning_rate, or a name only one parameter has), "
        "score each on --eval-dataset-version and mark the best as the model's best version",
    )
    p.add_argument(
        "--eval-dataset-version",
        default=None,
        metavar="APP/DATASET/VERSION",
        help="with --sweep: the held-out dataset version the candidates are scored on",
    )
    p.add_argument(
        "--metric",
        action="append",
        default=[],
        help="with --sweep: a metric to score with, the first one deciding (default: the "
        "evaluation's defaults)",
    )
    p.add_argument(
        "--eval-max-tokens",
        type=int,
        default=None,
        help="with --sweep: most tokens per answer when scoring (default: the model's)",
    )
    for name, fn, help in (
        ("status", cmd_status, "show a model version's state, progress and metrics"),
        ("logs", cmd_logs, "print a model version's training log"),
        ("watch", cmd_watch, "follow a model version's training live"),
        ("cancel", cmd_cancel, "cancel a queued or running model version"),
    ):
        p = add(name, fn, help)
        p.add_argument(
            "version", help="APP/MODEL/VERSION or apps/APP/models/MODEL/versions/VERSION"
        )
        if name == "watch":
            p.add_argument("--plot", default=None)
    p = add("checkpoints", cmd_checkpoints, "list a model version's checkpoints")
    p.add_argument("version", help="APP/MODEL/VERSION or apps/APP/models/MODEL/versions/VERSION")
    p = add(
        "export",
        cmd_export,
        "download a trained model version as one tar archive (PEFT adapter + manifest)",
    )
    p.add_argument(
        "version",
        help="APP/MODEL/VERSION, APP/MODEL/VERSION@STEP (a checkpoint) or a full name",
    )
    p.add_argument(
        "-o", "--output", default="", help="archive file or folder (default: the current folder)"
    )
    p.add_argument(
        "--merged",
        action="store_true",
        help="the base model with the adapter merged into its weights (safetensors), for "
        "engines without LoRA",
    )
    p = add("eval", cmd_eval, "evaluate a model version or the base model on held-out data")
    evals = p.add_subparsers(dest="eval_command", required=True, metavar="ACTION")
    e = evals.add_parser("create", help="score a model version (or --base) on a dataset version")
    e.add_argument("target", help="APP/MODEL/VERSION; with --base, APP/MODEL")
    e.add_argument("--dataset-version", required=True, help="APP/DATASET/VERSION, held out")
    e.add_argument("--base", action="store_true", help="score the base model (without an adapter)")
    e.add_argument(
        "--prompt-like",
        default="",
        metavar="APP/MODEL/VERSION",
        help="with --base: prompt the base model the way this version was trained (default: "
        "the model's latest trained version; `none`: the prompts as they are)",
    )
    e.add_argument(
        "--metric",
        action="append",
        default=[],
        help="exact_match, label_accuracy, label_likelihood, rouge, bleu or perplexity; repeat "
        "for more (default: label_accuracy and exact_match for labels, else exact_match, "
        "rouge and bleu)",
    )
    e.add_argument("--max-tokens", type=int, default=None, help="most tokens per answer")
    e.add_argument(
        "--inference-param", action="append", default=[], metavar="KEY=VALUE", help="e.g. top_p=0.9"
    )
    e.add_argument("--max-examples", type=int, default=0, help="score the first N (0: all)")
    e.add_argument(
        "--label-alias",
        action="append",
        default=[],
        metavar="ALIAS=LABEL",
        help="label accuracy reads the word ALIAS in an answer as LABEL (case-insensitive), "
        "e.g. neg=negative; repeat for more",
    )
    e.add_argument("--id", default="", help="evaluation id; generated when empty")
    e.add_argument("--no-wait", action="store_true", help="return once started")
    e = evals.add_parser("show", help="an evaluation's state, scores and confusion matrix")
    e.add_argument("evaluation", help="APP/MODEL/VERSION/EVALUATION, APP/MODEL/EVALUATION or full")
    e = evals.add_parser("cancel", help="stop a running evaluation (its results so far stay)")
    e.add_argument("evaluation")
    e = evals.add_parser("list", help="the evaluations of a model version or a model's base model")
    e.add_argument("target", help="APP/MODEL/VERSION or APP/MODEL")
    e = evals.add_parser("results", help="per-example results as a table")
    e.add_argument("evaluation")
    e.add_argument("--worst", action="store_true", help="worst first by the primary score")
    e.add_argument("--order-by", default="", help="a score, worst first; `SCORE desc`: best first")
    e.add_argument("--limit", type=int, default=20, help="rows to show (0: all)")
    e = evals.add_parser(
        "compare", help="two evaluations of one dataset version, example by example"
    )
    e.add_argument("evaluation", help="the one compared from (e.g. the base model's)")
    e.add_argument("other", help="the one compared to (e.g. the fine-tuned version's)")
    e.add_argument("--score", default="", help="the score compared (default: the primary one)")
    e.add_argument("--limit", type=int, default=20, help="changed examples to show (0: all)")
    p = add("predict", cmd_predict, "generate text with a model, a model version or the base model")
    p.add_argument(
        "model",
        nargs="?",
        default="",
        help="APP/MODEL, APP/MODEL/VERSION or a full name; omit with --base",
    )
    p.add_argument("text")
    p.add_argument("--base", action="store_true", help="use the base model without an adapter")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="most tokens to generate (the predictor's default when unset)",
    )
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--system-prompt", default="")
    p.add_argument("--prompt-template", default="")
    p.add_argument("--no-stream", action="store_true", help="wait for the whole output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except RunEnded as exc:  # already escaped
        err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        return 1
    except (ClientError, UsageError, RuntimeError) as exc:
        err_console.print(
            f"[red]error:[/red] {_one_line(str(exc))}", highlight=False, soft_wrap=True
        )
        return 1
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except Exception as exc:  # a bug: still one line, the traceback only on request
        if os.environ.get("LORAFORGE_DEBUG"):
            raise
        err_console.print(
            f"[red]error:[/red] unexpected {type(exc).__name__}: {_one_line(str(exc))} "
            "(LORAFORGE_DEBUG=1 shows the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
