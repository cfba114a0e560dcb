"""TrainerService: converts protobuf messages to domain calls and back, nothing more.

Runs (model versions) live in `runs.py`, templates in `templates.py`, evaluations in
`evaluations.py` (their RPCs' conversions in `evaluation_servicer.py`). Database
work runs in threads (`asyncio.to_thread`) and training runs in worker
processes, so the event loop only ever waits. Watch streams poll the run's
events table at a short interval.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from google.protobuf import duration_pb2, json_format, struct_pb2

from loraforge.services.common import base_models
from loraforge.services.common.errors import NotFound, invalid_field
from loraforge.services.common.pages import decode_token, encode_token, offset_page
from loraforge.services.common.resources import page_size, parse_name, timestamp, validate_id
from loraforge.services.common.rpc import Context
from loraforge.services.common.updates import update_paths
from loraforge.services.common.values import INT32_MAX, check_int
from loraforge.services.predictor.protos import params_from_proto, params_to_proto
from loraforge.services.trainer import templates as tpl
from loraforge.services.trainer.checkpoints import (
    CheckpointInfo,
    get_checkpoint,
    list_checkpoints,
    parse_checkpoint,
)
from loraforge.services.trainer.dataset_client import AsyncDatasetClient
from loraforge.services.trainer.estimates import Estimate, Estimates
from loraforge.services.trainer.evaluation_servicer import EvaluationRpcs
from loraforge.services.trainer.evaluations import Evaluations
from loraforge.services.trainer.exports import Archive, Exports
from loraforge.services.trainer.models import ModelChanges, Models, inference_params
from loraforge.services.trainer.predictor_client import AsyncPredictorClient
from loraforge.services.trainer.runs import MODEL, VERSION, NewRun, Run, Runs
from loraforge.services.trainer.store import (
    FINAL_STATES,
    MODEL_UPDATABLE,
    Event,
    EventKind,
    ModelRow,
    TrainerStore,
    model_etag,
)
from loraforge.trainer.v1 import trainer_service_pb2 as pb
from loraforge.trainer.v1 import trainer_service_pb2_grpc as pb_grpc

APP = "apps/{app}"
MAX_LOG_PAGE = 100_000
# Event sequence numbers are 32-bit columns: no run has a larger one.
MAX_SEQUENCE = INT32_MAX

TEXT_TO_TEXT = pb.ModelType(
    name=tpl.MODEL_TYPE,
    display_name="Text to text",
    description=(
        "Generates text from text: a causal language model fine-tuned with LoRA on (prompt, completion) "
        "pairs or plain texts, for completion, classification, translation, question answering, "
        "summarization and extraction."
    ),
    input_fields=[
        pb.ModelTypeField(
            path="input.data.text.raw", type="string", description="The prompt the model continues."
        )
    ],
    output_fields=[
        pb.ModelTypeField(
            path="output.data.text.raw", type="string", description="The generated completion."
        )
    ],
)

_PARAM_TYPES = {
    "bool": pb.PARAMETER_TYPE_BOOL,
    "int": pb.PARAMETER_TYPE_INT,
    "float": pb.PARAMETER_TYPE_FLOAT,
    "string": pb.PARAMETER_TYPE_STRING,
    "choice": pb.PARAMETER_TYPE_CHOICE,
    "string_list": pb.PARAMETER_TYPE_STRING_LIST,
}
_LOG_LEVELS = {
    "DEBUG": pb.LOG_LEVEL_DEBUG,
    "INFO": pb.LOG_LEVEL_INFO,
    "WARNING": pb.LOG_LEVEL_WARNING,
    "ERROR": pb.LOG_LEVEL_ERROR,
}


def _plain(value: Any) -> Any:
    if isinstance(value, struct_pb2.Struct):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, struct_pb2.ListValue):
        return [_plain(v) for v in value]
    return value


def _overrides(struct: struct_pb2.Struct) -> dict[str, Any]:
    """`param_overrides` as a dict; numbers JSON cannot hold (NaN, Infinity) are kept, so the
    run's check names the field that has one."""
    try:
        return json_format.MessageToDict(struct)
    except ValueError:
        plain: dict[str, Any] = _plain(struct)
        return plain


def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    return json_format.ParseDict(value, struct_pb2.Struct())


def template_to_pb(t: tpl.Template) -> pb.Template:
    """Blocking on a template's first conversion (the base model's files are read for its
    memory figure): call it in a thread."""
    hardware = tpl.hardware_of(t)
    needs = tpl.memory_needs(t)
    return pb.Template(
        name=t.resource_name,
        display_name=t.display_name,
        description=t.description,
        recommended=t.recommended,
        model_type=t.model_type,
        serving_engine=t.serving_engine,
        hardware=pb.Hardware(
            requires_cuda=hardware.requires_cuda,
            requires_gptq=hardware.requires_gptq,
            min_gpu_memory_gib=hardware.min_gpu_memory_gib,
            summary=hardware.summary,
            estimated_peak_memory_bytes=needs.peak_bytes if needs else 0,
        ),
        parameters=[
            pb.Parameter(
                path=p.path,
                type=_PARAM_TYPES[p.type],
                default_value=json_format.ParseDict(p.default, struct_pb2.Value()),
                description=p.description,
                min=p.min,
                max=p.max,
                choices=list(p.choices),
                nullable=p.nullable,
            )
            for p in t.parameters
        ],
    )


def base_model_to_pb(entry: base_models.BaseModel) -> pb.BaseModel:
    where = base_models.availability(entry)
    return pb.BaseModel(
        name=entry.resource_name,
        model_id=entry.model_id,
        display_name=entry.display_name,
        description=entry.description,
        architecture=entry.architecture,
        parameter_count=entry.parameter_count,
        context_length=entry.context_length,
        chat_template=entry.chat_template,
        serving_engine=entry.serving_engine,
        available_locally=where.present,
        local_source=where.where,
    )


def _model_fields(model: pb.Model, paths: set[str]) -> ModelChanges:
    """The user's fields of `model` that `paths` names (an update's mask, or all at create)."""
    has_params = model.HasField("default_inference_params")
    return ModelChanges(
        description=model.description if "description" in paths else None,
        notes=model.notes if "notes" in paths else None,
        inference_params=(
            params_from_proto(model.default_inference_params)
            if "default_inference_params" in paths and has_params
            else None
        ),
        clear_inference_params="default_inference_params" in paths and not has_params,
        best_version=model.best_version if "best_version" in paths else None,
    )


def model_to_pb(row: ModelRow) -> pb.Model:
    message = pb.Model(
        name=row.name,
        description=row.description,
        model_type=row.model_type,
        latest_trained_version=row.latest_trained_version,
        create_time=timestamp(row.create_time),
        notes=row.notes or "",
        etag=model_etag(row),
        best_version=row.best_version or "",
    )
    defaults = inference_params(row)
    if defaults is not None:
        message.default_inference_params.CopyFrom(params_to_proto(defaults))
    return message


def progress_to_pb(p: dict[str, Any]) -> pb.TrainingProgress:
    msg = pb.TrainingProgress(
        step=int(p.get("step", 0)),
        total_steps=int(p.get("total_steps", 0)),
        epoch=float(p.get("epoch", 0.0)),
        learning_rate=float(p.get("learning_rate", 0.0)),
        tokens_per_second=float(p.get("tokens_per_second", 0.0)),
    )
    if "train_loss" in p:
        msg.train_loss = float(p["train_loss"])
    if "eval_loss" in p:
        msg.eval_loss = float(p["eval_loss"])
    eta = duration_pb2.Duration()
    eta.FromNanoseconds(int(float(p.get("eta_seconds", 0.0)) * 1e9))
    msg.eta.CopyFrom(eta)
    return msg


def version_to_pb(run: Run) -> pb.ModelVersion:
    return pb.ModelVersion(
        name=run.name,
        template=run.template,
        dataset_version=run.dataset_version,
        param_overrides=_struct(run.param_overrides),
        params=_struct(run.params.to_dict()),
        state=pb.ModelVersionState.Value(f"MODEL_VERSION_STATE_{run.state.value}"),
        status_code=run.status_code,
        failure_reason=run.failure_reason,
        progress=progress_to_pb(run.progress),
        artifacts=pb.Artifacts(
            adapter_prefix=run.adapter_prefix,
            base_model=run.base_model,
            checkpoint_prefix=run.checkpoint_prefix,
            adapter_bytes=run.adapter_bytes,
        ),
        metrics=run.metrics,
        create_time=timestamp(run.create_time),
        start_time=timestamp(run.start_time),
        end_time=timestamp(run.end_time),
        attempts=run.attempts,
        description=run.description,
        status_message=run.status_message,
        from_model_version=run.from_model_version,
    )


def event_to_pb(event: Event) -> pb.TrainingEvent:
    msg = pb.TrainingEvent(sequence=event.sequence, time=timestamp(event.time))
    p = event.payload
    if event.kind == EventKind.STATE:
        msg.state_change.CopyFrom(
            pb.StateChange(
                state=pb.ModelVersionState.Value(f"MODEL_VERSION_STATE_{p['state']}"),
                status_code=int(p.get("status_code", 0)),
                message=p.get("message", ""),
            )
        )
    elif event.kind == EventKind.PROGRESS:
        msg.progress.CopyFrom(progress_to_pb(p))
    else:
        msg.log.CopyFrom(
            pb.LogLine(
                level=_LOG_LEVELS.get(p.get("level", "INFO"), pb.LOG_LEVEL_INFO),
                message=p.get("message", ""),
            )
        )
    return msg


class TrainerServicer(EvaluationRpcs, pb_grpc.TrainerServiceServicer):
    def __init__(
        self,
        store: TrainerStore,
        runs: Runs,
        datasets: AsyncDatasetClient,
        *,
        watch_poll_seconds: float = 0.25,
        exports: Exports | None = None,
        evaluations: Evaluations | None = None,
    ) -> None:
        self.store = store
        self.runs = runs
        self.models = Models(store, datasets)
        self.datasets = datasets
        self.watch_poll_seconds = watch_poll_seconds
        self.exports = exports or Exports(store, runs.objects, runs.models)
        self.estimates = Estimates(store, runs, datasets)
        # Without one, evaluations are refused: there is no predictor to generate with.
        self.evaluations = evaluations or Evaluations(store, datasets, AsyncPredictorClient(""))

    # Model types and templates.

    async def ListModelTypes(
        self, request: pb.ListModelTypesRequest, context: Context
    ) -> pb.ListModelTypesResponse:
        model_type = pb.ModelType()
        model_type.CopyFrom(TEXT_TO_TEXT)
        model_type.templates.extend(t.resource_name for t in tpl.all_templates())
        items, token = offset_page(
            [model_type], page_size(request.page_size), request.page_token, "ListModelTypes"
        )
        return pb.ListModelTypesResponse(model_types=items, next_page_token=token)

    async def ListTemplates(
        self, request: pb.ListTemplatesRequest, context: Context
    ) -> pb.ListTemplatesResponse:
        if request.model_type and request.model_type != tpl.MODEL_TYPE:
            parse_name(request.model_type, "modelTypes/{model_type}", "model_type")
            items: list[tpl.Template] = []
        else:
            items = list(tpl.all_templates())
        chunk, token = offset_page(
            items,
            page_size(request.page_size),
            request.page_token,
            "ListTemplates",
            filter=request.model_type,
        )
        templates = await asyncio.to_thread(lambda: [template_to_pb(t) for t in chunk])
        return pb.ListTemplatesResponse(templates=templates, next_page_token=token)

    async def GetTemplate(
        self, request: pb.GetTemplateRequest, context: Context
    ) -> pb.GetTemplateResponse:
        template = tpl.get_template(request.name)
        return pb.GetTemplateResponse(template=await asyncio.to_thread(template_to_pb, template))

    async def ListBaseModels(
        self, request: pb.ListBaseModelsRequest, context: Context
    ) -> pb.ListBaseModelsResponse:
        chunk, token = offset_page(
            list(base_models.CATALOGUE),
            page_size(request.page_size),
            request.page_token,
            "ListBaseModels",
        )
        items = await asyncio.to_thread(lambda: [base_model_to_pb(e) for e in chunk])
        return pb.ListBaseModelsResponse(base_models=items, next_page_token=token)

    # Models.

    async def CreateModel(
        self, request: pb.CreateModelRequest, context: Context
    ) -> pb.CreateModelResponse:
        app = parse_name(request.parent, APP, "parent")["app"]
        validate_id(request.model_id, "model_id")
        model_type = request.model.model_type or tpl.MODEL_TYPE
        if model_type != tpl.MODEL_TYPE:
            raise invalid_field(
                "model.model_type", f"{model_type!r} is not a model type; use {tpl.MODEL_TYPE}"
            )
        fields = _model_fields(request.model, set(MODEL_UPDATABLE))
        row = await self.models.create(app, request.model_id, model_type, fields)
        return pb.CreateModelResponse(model=model_to_pb(row))

    async def GetModel(self, request: pb.GetModelRequest, context: Context) -> pb.GetModelResponse:
        parse_name(request.name, MODEL)
        return pb.GetModelResponse(
            model=model_to_pb(await asyncio.to_thread(self.store.get_model, request.name))
        )

    async def UpdateModel(
        self, request: pb.UpdateModelRequest, context: Context
    ) -> pb.UpdateModelResponse:
        model = request.model
        paths = update_paths(
            model,
            request.HasField("update_mask"),
            request.update_mask.paths,
            (*MODEL_UPDATABLE, "best_version"),
        )
        row = await self.models.update(model.name, _model_fields(model, paths), model.etag)
        return pb.UpdateModelResponse(model=model_to_pb(row))

    async def ListModels(
        self, request: pb.ListModelsRequest, context: Context
    ) -> pb.ListModelsResponse:
        app = parse_name(request.parent, APP, "parent")["app"]
        size = page_size(request.page_size)
        position = decode_token(request.page_token, "ListModels", request.parent, ("after",))
        after = position["after"] if position else 0
        rows, more = await asyncio.to_thread(self.store.list_models, app, size, after)
        token = encode_token("ListModels", request.parent, {"after": rows[-1].seq}) if more else ""
        return pb.ListModelsResponse(models=[model_to_pb(r) for r in rows], next_page_token=token)

    async def DeleteModel(
        self, request: pb.DeleteModelRequest, context: Context
    ) -> pb.DeleteModelResponse:
        await self.runs.delete_model(request.name, request.force)
        return pb.DeleteModelResponse()

    # Model versions.

    async def CreateModelVersion(
        self, request: pb.CreateModelVersionRequest, context: Context
    ) -> pb.CreateModelVersionResponse:
        run = await self.runs.create(
            NewRun(
                parent=request.parent,
                version_id=request.version_id,
                template=request.template,
                dataset_version=request.dataset_version,
                param_overrides=_overrides(request.param_overrides),
                description=request.description,
                request_id=request.request_id,
                from_model_version=request.from_model_version,
            )
        )
        return pb.CreateModelVersionResponse(model_version=version_to_pb(run))

    async def GetModelVersion(
        self, request: pb.GetModelVersionRequest, context: Context
    ) -> pb.GetModelVersionResponse:
        run = await self.runs.get(request.name)
        return pb.GetModelVersionResponse(model_version=version_to_pb(run))

    async def ListModelVersions(
        self, request: pb.ListModelVersionsRequest, context: Context
    ) -> pb.ListModelVersionsResponse:
        parse_name(request.parent, MODEL, "parent")
        size = page_size(request.page_size)
        method = "ListModelVersions"
        position = decode_token(request.page_token, method, request.parent, ("before",))
        before = position["before"] if position else None
        runs, next_before = await self.runs.page(request.parent, size, before)
        token = (
            encode_token(method, request.parent, {"before": next_before})
            if next_before is not None
            else ""
        )
        return pb.ListModelVersionsResponse(
            model_versions=[version_to_pb(r) for r in runs], next_page_token=token
        )

    async def DeleteModelVersion(
        self, request: pb.DeleteModelVersionRequest, context: Context
    ) -> pb.DeleteModelVersionResponse:
        await self.runs.delete(request.name)
        await self.models.forget_version(request.name)
        return pb.DeleteModelVersionResponse()

    async def CancelModelVersion(
        self, request: pb.CancelModelVersionRequest, context: Context
    ) -> pb.CancelModelVersionResponse:
        run = await self.runs.cancel(request.name)
        return pb.CancelModelVersionResponse(model_version=version_to_pb(run))

    async def WatchModelVersion(
        self, request: pb.WatchModelVersionRequest, context: Context
    ) -> AsyncIterator[pb.WatchModelVersionResponse]:
        parse_name(request.name, VERSION)
        check_int(request.after_sequence, "after_sequence", maximum=MAX_SEQUENCE)
        await asyncio.to_thread(self.store.get_version, request.name)
        after = request.after_sequence
        while True:
            # Read the state before the events: the final event commits with the final state,
            # so once the state is final this read of the events includes it.
            state = await asyncio.to_thread(self.store.version_state, request.name)
            if state is None:
                raise NotFound(
                    f"model version {request.name!r} was deleted", reason="VERSION_NOT_FOUND"
                )
            events = await asyncio.to_thread(self.store.events_after, request.name, after)
            for event in events:
                yield pb.WatchModelVersionResponse(event=event_to_pb(event))
                after = event.sequence
                if event.is_final_state:
                    return
            if not events:
                if state in FINAL_STATES:
                    return
                await asyncio.sleep(self.watch_poll_seconds)

    async def GetModelVersionLogs(
        self, request: pb.GetModelVersionLogsRequest, context: Context
    ) -> pb.GetModelVersionLogsResponse:
        parse_name(request.name, VERSION)
        size = page_size(request.page_size, default=MAX_LOG_PAGE, maximum=MAX_LOG_PAGE)
        method = "GetModelVersionLogs"
        position = decode_token(request.page_token, method, request.name, ("after",))
        after = position["after"] if position else 0
        await asyncio.to_thread(self.store.get_version, request.name)
        events = await asyncio.to_thread(
            self.store.events_after, request.name, after, size + 1, EventKind.LOG
        )
        more = len(events) > size
        events = events[:size]
        token = encode_token(method, request.name, {"after": events[-1].sequence}) if more else ""
        return pb.GetModelVersionLogsResponse(
            events=[event_to_pb(e) for e in events], next_page_token=token
        )

    async def EstimateModelVersion(
        self, request: pb.EstimateModelVersionRequest, context: Context
    ) -> pb.EstimateModelVersionResponse:
        estimate = await self.estimates.estimate(
            NewRun(
                parent=request.parent,
                version_id="",
                template=request.template,
                dataset_version=request.dataset_version,
                param_overrides=_overrides(request.param_overrides),
                from_model_version=request.from_model_version,
            )
        )
        return estimate_to_pb(estimate)

    async def GetCheckpoint(
        self, request: pb.GetCheckpointRequest, context: Context
    ) -> pb.GetCheckpointResponse:
        version = parse_checkpoint(request.name)[0]
        run = await self.runs.get(version)
        found = await asyncio.to_thread(
            get_checkpoint, self.runs.objects, request.name, "name", run
        )
        message = checkpoint_to_pb(found)
        message.adapter_prefix = found.prefix
        message.base_model = await self.runs.loaded_base_model(run)
        return pb.GetCheckpointResponse(checkpoint=message)

    async def ListCheckpoints(
        self, request: pb.ListCheckpointsRequest, context: Context
    ) -> pb.ListCheckpointsResponse:
        parse_name(request.parent, VERSION, "parent")
        # A bad token is the request's mistake whether or not the version exists.
        decode_token(request.page_token, "ListCheckpoints", "", ("offset",), filter=request.parent)
        await asyncio.to_thread(self.store.get_version, request.parent)
        found = await asyncio.to_thread(list_checkpoints, self.runs.objects, request.parent)
        chunk, token = offset_page(
            found,
            page_size(request.page_size),
            request.page_token,
            "ListCheckpoints",
            filter=request.parent,
        )
        return pb.ListCheckpointsResponse(
            checkpoints=[checkpoint_to_pb(c) for c in chunk], next_page_token=token
        )

    async def ExportModelVersion(
        self, request: pb.ExportModelVersionRequest, context: Context
    ) -> AsyncIterator[pb.ExportModelVersionResponse]:
        archive = await self.exports.export(request.name, request.merged)
        chunks = archive.chunks()
        try:
            yield pb.ExportModelVersionResponse(info=export_info_pb(archive))
            while chunk := await asyncio.to_thread(next, chunks, b""):
                yield pb.ExportModelVersionResponse(chunk=chunk)
        finally:
            chunks.close()
            await asyncio.to_thread(archive.close)


def estimate_to_pb(e: Estimate) -> pb.EstimateModelVersionResponse:
    message = pb.EstimateModelVersionResponse(
        examples_total=e.examples_total,
        examples_kept=e.examples_kept,
        examples_dropped=e.examples_total - e.examples_kept,
        dropped_by_code=e.dropped_by_code,
        dropped=[pb.DroppedExample(input=d.input, code=d.code, reason=d.reason) for d in e.dropped],
        train_examples=e.train_examples,
        eval_examples=e.eval_examples,
        tokens_per_epoch=e.tokens_per_epoch,
        total_tokens=e.total_tokens,
        steps=e.steps,
        epochs=e.epochs,
        tokens_per_second=e.tokens_per_second,
        calibration=e.calibration,
        estimated_peak_memory_bytes=e.peak_memory_bytes,
        worker_kind=e.worker_kind,
        examples_truncated=e.examples_truncated,
    )
    if e.seconds is not None:
        message.estimated_time.FromNanoseconds(int(e.seconds * 1e9))
    return message


def checkpoint_to_pb(c: CheckpointInfo) -> pb.Checkpoint:
    message = pb.Checkpoint(
        name=c.name, step=c.step, epoch=c.epoch, create_time=timestamp(c.create_time)
    )
    if c.train_loss is not None:
        message.train_loss = c.train_loss
    if c.eval_loss is not None:
        message.eval_loss = c.eval_loss
    message.eval_scores.update(c.eval_scores)
    return message


def export_info_pb(archive: Archive) -> pb.ExportInfo:
    return pb.ExportInfo(
        file_name=archive.file_name,
        size_bytes=archive.size_bytes,
        sha256=archive.sha256,
        files=archive.files,
        manifest=_struct(archive.manifest),
    )
