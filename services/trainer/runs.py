"""Training runs (model versions): create, read, cancel, delete, and their dataset references.

This is the trainer's domain for runs; it knows nothing of gRPC and raises the
typed errors of `common.errors`. Database work runs in threads so callers on an
event loop only wait.

Creating a run is a small saga across two services. The run holds a reference
on its dataset version (so the dataset service refuses to delete it), and the
reference must exist before the run's row does, because a worker may claim the
run the moment it is inserted. So: record a pending reference in the trainer's
database, add the reference in the dataset service, then insert the run (which
ends the pending reference in the same transaction). If the insert fails, the
reference is removed again. A crash between the steps leaves a reference with no
run behind it; `sweep_references` removes those, and also the references left by
a run deleted while the dataset service was unreachable. A referrer with a fresh
pending reference is a creation still in flight (on this or another replica)
and is left alone.

The dataset service's references to names shaped like model versions belong to
this trainer (one trainer database per dataset service).

A run records what a worker needs to train it (CUDA, GPTQModel, GPU memory,
from its template and parameters); this process never checks its own hardware,
since training happens on the workers. A run that no live worker can take stays
queued: its status message says what it waits for and what the live workers
lack, and the same words go into its log when they change (`note_waiting`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from loraforge.services.common.errors import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    FieldViolation,
    LoraforgeError,
    NotFound,
    invalid_field,
)
from loraforge.services.common.model_access import MODEL_FIELD, ModelAccess
from loraforge.services.common.objectstore import ObjectStore
from loraforge.services.common.resources import new_id, parse_name, validate_id
from loraforge.services.common.values import check_json, check_request_id, check_text
from loraforge.services.trainer import memory_fit
from loraforge.services.trainer import templates as tpl
from loraforge.services.trainer.checkpoints import (
    get_checkpoint,
    is_checkpoint_name,
    parse_checkpoint,
)
from loraforge.services.trainer.continuation import (
    INIT_ADAPTER,
    INIT_FILES,
    check_compatible,
    merged_overrides,
)
from loraforge.services.trainer.hardware import (
    LiveWorker,
    Requirements,
    unmet,
    waiting_reason,
)
from loraforge.services.trainer.params import TrainingParams
from loraforge.services.trainer.store import (
    State,
    TrainerStore,
    VersionRow,
    requirements_of,
    version_prefix,
)
from loraforge.services.trainer.workers import Workers

log = logging.getLogger("loraforge.trainer.runs")

MODEL = "apps/{app}/models/{model}"
VERSION = "apps/{app}/models/{model}/versions/{version}"
DATASET_VERSION = "apps/{app}/datasets/{dataset}/versions/{version}"
# Longer than any creation takes between recording its pending reference and inserting its
# run (two RPC timeouts and an insert); an older pending reference belongs to a creation that died.
PENDING_REFERENCE_SECONDS = 600.0
MAX_DESCRIPTION_CHARS = 10_000


class DatasetReferences(Protocol):
    """What runs need of the dataset service (`dataset_client.AsyncDatasetClient`)."""

    async def get_ready_version(self, name: str, field: str) -> Any: ...

    async def add_reference(self, name: str, referrer: str) -> None: ...

    async def remove_reference(self, name: str, referrer: str) -> None: ...

    def referenced_versions(self) -> AsyncIterator[tuple[str, tuple[str, ...]]]: ...


@dataclass(frozen=True)
class Run:
    """One training run (a model version) as the domain sees it."""

    name: str
    model: str
    template: str
    dataset_version: str
    description: str
    param_overrides: dict[str, Any]
    params: TrainingParams
    state: State
    status_code: int
    failure_reason: str
    progress: dict[str, Any]
    metrics: dict[str, float]
    base_model: str  # what it was trained on: the adapter's base once trained, else the parameter
    adapter_prefix: str
    checkpoint_prefix: str
    adapter_bytes: int
    create_time: float
    start_time: float | None
    end_time: float | None
    attempts: int
    request_id: str
    requirements: Requirements
    # For a queued run, what it waits for (see `hardware.waiting_reason`); else empty.
    status_message: str = ""
    # A continued run: the version whose adapter it started from; else empty.
    from_model_version: str = ""


def run_from_row(row: VersionRow, live: Sequence[LiveWorker] | None = None) -> Run:
    """The run of `row`; with the live workers, a queued run's status message says what it waits for."""
    try:
        params = tpl.stored_params(row.template, row.params or {})
    except ValueError as exc:
        raise FailedPrecondition(
            f"model version {row.name!r} has stored parameters this trainer cannot read ({exc}); "
            "delete it and create the run again",
            reason="VERSION_PARAMS_UNREADABLE",
        ) from None
    needs = requirements_of(row.needs_cuda, row.needs_gptq, row.needs_gpu_memory_gib)
    waiting = status_message(needs, live) if row.state == State.QUEUED and live is not None else ""
    return Run(
        name=row.name,
        model=row.model,
        template=row.template,
        dataset_version=row.dataset_version,
        description=row.description or "",
        param_overrides=dict(row.param_overrides or {}),
        params=params,
        state=State(row.state),
        status_code=row.status_code,
        failure_reason=row.failure_reason or "",
        progress=dict(row.progress or {}),
        metrics={k: float(v) for k, v in (row.metrics or {}).items()},
        base_model=row.base_model or params.base_model,
        adapter_prefix=row.adapter_prefix or "",
        checkpoint_prefix=row.checkpoint_prefix or "",
        adapter_bytes=row.adapter_bytes or 0,
        create_time=row.create_time,
        start_time=row.start_time,
        end_time=row.end_time,
        attempts=row.attempts or 0,
        request_id=row.request_id or "",
        requirements=needs,
        status_message=waiting,
        from_model_version=row.from_model_version or "",
    )


def status_message(needs: Requirements, live: Sequence[LiveWorker]) -> str:
    """What a queued run waits for: a worker that can train it, or a free one."""
    reason = waiting_reason(needs, live)
    if reason:
        return reason
    able = sum(1 for w in live if not unmet(needs, w.capabilities))
    return f"waiting for a free worker ({able} live worker{'s' if able > 1 else ''} can train it)"


@dataclass(frozen=True)
class Source:
    """What a continued run starts from: a version or one of its checkpoints."""

    name: str  # the version's or the checkpoint's
    run: Run  # the version
    adapter_prefix: str
    trained_on: str  # the base model, as loaded


@dataclass(frozen=True)
class Plan:
    """A run's checked parameters, before anything is created (`Runs.plan`)."""

    template: tpl.Template
    params: TrainingParams
    loadable: str  # what the base model's name resolves to
    needs: Requirements
    source: Source | None
    overrides: dict[str, Any]  # the request's, on top of the source's when it continues one

    @property
    def needs_cuda(self) -> bool:
        return self.needs.cuda


@dataclass(frozen=True)
class NewRun:
    """What a client asks for when it creates a run; field names are the request's."""

    parent: str  # the model
    version_id: str  # empty: generated
    template: str
    dataset_version: str
    param_overrides: dict[str, Any]
    description: str = ""
    request_id: str = ""
    from_model_version: str = ""  # continue from this version's adapter


class Runs:
    def __init__(
        self,
        store: TrainerStore,
        objects: ObjectStore,
        datasets: DatasetReferences,
        *,
        clock: Callable[[], float] = time.time,
        pending_reference_seconds: float = PENDING_REFERENCE_SECONDS,
        models: ModelAccess | None = None,
    ) -> None:
        self.store = store
        # What a run's base model may name; no model roots unless the operator configures some.
        self.models = models or tpl.model_access((), allow_hub_models=False)
        self.objects = objects
        self.datasets = datasets
        self.clock = clock
        self.pending_reference_seconds = pending_reference_seconds
        self.workers = Workers(store, clock)

    async def plan(self, new: NewRun) -> Plan:
        """Checks what a run would train (template, parameters, data, base model, what it
        continues from) without creating anything: `create` and estimates start here."""
        parent = parse_name(new.parent, MODEL, "parent")
        check_json(new.param_overrides, "param_overrides")
        template_name, overrides = new.template, new.param_overrides
        source: Source | None = None
        if new.from_model_version:
            source = await self._continued(new.from_model_version, parent["app"])
            template_name = template_name or source.run.template
            if template_name == source.run.template:
                overrides = merged_overrides(source.run.param_overrides, overrides)
        template = tpl.get_template(template_name, "template")
        params = tpl.resolve_params(template, overrides)
        dataset = parse_name(new.dataset_version, DATASET_VERSION, "dataset_version")
        if dataset["app"] != parent["app"]:
            raise invalid_field(
                "dataset_version",
                f"{new.dataset_version!r} belongs to app {dataset['app']!r}, not to the model's "
                f"app {parent['app']!r}; train on a dataset version of {parent['app']!r}",
            )
        needs = tpl.requirements(template, params)
        # Refused here, so a name that is not allowed never queues; the worker checks it again.
        loadable = await asyncio.to_thread(
            self.models.resolve, params.base_model, f"param_overrides.{MODEL_FIELD}"
        )
        if source is not None:
            check_compatible(source.name, source.trained_on, source.run.params, params, loadable)
        await asyncio.to_thread(tpl.check_base_model, loadable)
        await asyncio.to_thread(self.store.get_model, new.parent)
        return Plan(template, params, loadable, needs, source, dict(overrides))

    async def create(self, new: NewRun) -> Run:
        """Validates, references the dataset version, queues the run. Idempotent on `request_id`."""
        parse_name(new.parent, MODEL, "parent")
        version_id = validate_id(new.version_id, "version_id") if new.version_id else new_id("v")
        check_text(new.description, "description", MAX_DESCRIPTION_CHARS)
        check_request_id(new.request_id, "request_id")
        plan = await self.plan(new)
        template, params, source, needs = plan.template, plan.params, plan.source, plan.needs
        overrides = plan.overrides
        if new.request_id:
            existing = await self._by_request_id(new.parent, new.request_id)
            if existing is not None:
                return existing
        name = f"{new.parent}/versions/{version_id}"
        if await asyncio.to_thread(self.store.version_exists, name):
            raise AlreadyExists(
                f"model version {name!r} already exists; pick another version_id",
                reason="VERSION_EXISTS",
            )
        if not needs.cuda:  # trained in a worker's memory: refused if no live worker has enough
            live = await asyncio.to_thread(self.workers.live)
            refused = await asyncio.to_thread(memory_fit.refusal, params, plan.loadable, live)
            if refused:
                raise FailedPrecondition(refused, reason="RUN_EXCEEDS_WORKER_MEMORY")
        await self.datasets.get_ready_version(new.dataset_version, "dataset_version")
        row = VersionRow(
            name=name,
            model=new.parent,
            template=template.resource_name,
            dataset_version=new.dataset_version,
            description=new.description,
            param_overrides=tpl.normalise_overrides(template, overrides),
            params=params.to_dict(),
            failure_reason="",
            progress={},
            metrics={},
            request_id=new.request_id or None,
            needs_cuda=needs.cuda,
            needs_gptq=needs.gptq,
            needs_gpu_memory_gib=needs.gpu_memory_gib,
            from_model_version=source.name if source is not None else None,
        )
        if source is not None:
            # Before the row exists: a worker may claim the run the moment it is inserted.
            await asyncio.to_thread(self._copy_init_adapter, source, name)
        await asyncio.to_thread(self.store.begin_reference, name, new.dataset_version, self.clock())
        try:
            await self.datasets.add_reference(new.dataset_version, name)
            created = await asyncio.to_thread(self.store.create_version, row)
        except LoraforgeError as exc:
            await self._undo_reference(name, new.dataset_version)
            if source is not None and not await asyncio.to_thread(self.store.version_exists, name):
                await asyncio.to_thread(self.objects.delete_prefix, f"{version_prefix(name)}/")
            if isinstance(exc, AlreadyExists | NotFound) and new.request_id:
                # A concurrent retry with the same request id won the race.
                existing = await self._by_request_id(new.parent, new.request_id)
                if existing is not None:
                    return existing
            raise
        log.info("queued %s (%s on %s)", name, template.name, new.dataset_version)
        live = await asyncio.to_thread(self.workers.live)
        reason = waiting_reason(needs, live)
        if reason:
            await asyncio.to_thread(self.store.note_waiting, name, reason)
        return run_from_row(created, live)

    async def _continued(self, name: str, app: str) -> Source:
        """What a new run of `app` continues from: a TRAINED version, or a checkpoint."""
        field = "from_model_version"
        checkpoint = is_checkpoint_name(name)
        version = parse_checkpoint(name, field)[0] if checkpoint else name
        source = parse_name(version, VERSION, field)
        if source["app"] != app:
            raise invalid_field(
                field,
                f"{name!r} belongs to app {source['app']!r}, not to the model's app {app!r}; "
                f"continue from a version of {app!r}",
            )
        try:
            run = run_from_row(await asyncio.to_thread(self.store.get_version, version))
        except NotFound:
            raise NotFound(
                f"model version {version!r} (from_model_version) not found",
                reason="VERSION_NOT_FOUND",
                field_violations=[FieldViolation(field, "no such model version")],
            ) from None
        if checkpoint:
            found = await asyncio.to_thread(get_checkpoint, self.objects, name, field, run)
            adapter_prefix = found.prefix
        elif run.state != State.TRAINED or not run.adapter_prefix:
            raise FailedPrecondition(
                f"from_model_version {name!r} is {run.state.value}; a run continues from the "
                "adapter of a TRAINED version (or from one of a version's checkpoints), so "
                "wait until it is trained or pick another",
                reason="SOURCE_NOT_TRAINED",
                metadata={"state": run.state.value},
            )
        else:
            adapter_prefix = run.adapter_prefix
        return Source(name, run, adapter_prefix, await self.loaded_base_model(run))

    async def loaded_base_model(self, run: Run) -> str:
        """The base model `run` trains on, as loaded: a version records it so once trained,
        and as named before."""
        if run.state == State.TRAINED:
            return run.base_model
        with contextlib.suppress(LoraforgeError):
            return await asyncio.to_thread(self.models.resolve, run.params.base_model)
        return run.params.base_model

    def _copy_init_adapter(self, source: Source, name: str) -> None:
        """Copies `source`'s adapter under the new run's prefix, where its worker reads it."""
        for file_name in INIT_FILES:
            key = f"{source.adapter_prefix}/{file_name}"
            try:
                chunks = self.objects.iter_chunks(key)
            except NotFound:
                raise DataLoss(
                    f"the adapter of {source.name!r} (from_model_version) is incomplete in the "
                    f"object store ({file_name} is missing); continue from another version",
                    reason="ADAPTER_MISSING",
                ) from None
            self.objects.put_stream(f"{version_prefix(name)}/{INIT_ADAPTER}/{file_name}", chunks)

    async def note_waiting(self) -> int:
        """Records, in each queued run's log, why no live worker can take it, when that changed.

        Returns how many runs' reasons changed. The trainer calls it periodically, so a
        watcher learns when a run is stuck for want of a worker, and why.
        """
        live = await asyncio.to_thread(self.workers.live)
        changed = 0
        for name, needs, recorded in await asyncio.to_thread(self.store.queued_waits):
            reason = waiting_reason(needs, live)
            if reason != recorded and await asyncio.to_thread(
                self.store.note_waiting, name, reason
            ):
                changed += 1
        return changed

    async def _live_if_queued(self, rows: Sequence[VersionRow]) -> list[LiveWorker] | None:
        if not any(r.state == State.QUEUED for r in rows):
            return None
        return await asyncio.to_thread(self.workers.live)

    async def _by_request_id(self, model: str, request_id: str) -> Run | None:
        row = await asyncio.to_thread(self.store.find_by_request_id, model, request_id)
        if row is None:
            return None
        return run_from_row(row, await self._live_if_queued([row]))

    async def _undo_reference(self, name: str, dataset_version: str) -> None:
        """Removes the reference of a run that was not created (unless another call created it)."""
        if await asyncio.to_thread(self.store.version_exists, name):
            return
        try:
            await self.datasets.remove_reference(dataset_version, name)
        except LoraforgeError:
            log.warning("could not remove the reference of %s yet; the sweep will", name)
            return
        await asyncio.to_thread(self.store.end_reference, name)

    async def get(self, name: str) -> Run:
        parse_name(name, VERSION)
        row = await asyncio.to_thread(self.store.get_version, name)
        return run_from_row(row, await self._live_if_queued([row]))

    async def page(self, model: str, size: int, before: int | None) -> tuple[list[Run], int | None]:
        """A page of a model's runs, newest first, and the cursor of the next page (None: last)."""
        parse_name(model, MODEL, "parent")
        await asyncio.to_thread(self.store.get_model, model)
        rows, more = await asyncio.to_thread(self.store.list_versions, model, size, before)
        live = await self._live_if_queued(rows)
        return [run_from_row(r, live) for r in rows], (rows[-1].seq if more else None)

    async def cancel(self, name: str) -> Run:
        parse_name(name, VERSION)
        return run_from_row(await asyncio.to_thread(self.store.cancel_version, name))

    async def delete(self, name: str) -> None:
        parse_name(name, VERSION)
        row = await asyncio.to_thread(self.store.delete_version, name)
        await self._release(row)

    async def delete_model(self, name: str, force: bool) -> None:
        parse_name(name, MODEL)
        for row in await asyncio.to_thread(self.store.delete_model, name, force):
            await self._release(row)

    async def _release(self, row: VersionRow) -> None:
        """Deletes a removed run's artifacts and its hold on the dataset version."""
        await asyncio.to_thread(self.objects.delete_prefix, version_prefix(row.name) + "/")
        await self.datasets.remove_reference(row.dataset_version, row.name)

    async def sweep_references(self) -> list[tuple[str, str]]:
        """Removes dataset-version references whose run does not exist; returns (version, referrer)."""
        fresh_since = self.clock() - self.pending_reference_seconds
        removed: list[tuple[str, str]] = []
        async for dataset_version, referrers in self.datasets.referenced_versions():
            ours = [r for r in referrers if _is_run_name(r)]
            if not ours:
                continue
            orphans = await asyncio.to_thread(self.store.unjustified_referrers, ours, fresh_since)
            for referrer in orphans:
                await self.datasets.remove_reference(dataset_version, referrer)
                log.warning(
                    "removed the reference of %s on %s: no such run (its creation or deletion "
                    "was interrupted)",
                    referrer,
                    dataset_version,
                )
                removed.append((dataset_version, referrer))
        # Each stale one's reference, if it was ever added, was removed above.
        await asyncio.to_thread(self.store.forget_pending_references, fresh_since)
        return removed


def _is_run_name(name: str) -> bool:
    try:
        parse_name(name, VERSION)
    except LoraforgeError:
        return False
    return True
