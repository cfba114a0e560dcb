"""Training pages: the form made from a template's parameters, runs, the live run page.

A run's events reach the page as server-sent events (`events`), resumable by sequence."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import grpc
from google.protobuf import json_format
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse

from loraforge.client.client import ClientError
from loraforge.dataset.v1 import dataset_service_pb2 as dpb
from loraforge.services.console import events, forms
from loraforge.services.console.web import (
    FINAL_STATES,
    Ctx,
    Web,
    error_text,
    run_state,
    status_of,
)
from loraforge.trainer.v1 import trainer_service_pb2 as tpb


class TrainingPages(Web):
    """The training form, the runs list, a run's page and its event stream."""

    async def train_page(
        self,
        request: Request,
        ctx: Ctx,
        *,
        values: dict[str, str] | None = None,
        errors: dict[str, str] | None = None,
        general: list[str] | None = None,
        status: int = 200,
        template_name: str = "",
    ) -> Response:
        app = f"apps/{request.path_params['app']}"
        templates, versions, models, model_types = await asyncio.gather(
            self.backend.templates(ctx.key),
            self.backend.app_versions(app, ctx.key),
            self.backend.models(app, ctx.key),
            self.backend.model_types(ctx.key),
        )
        chosen = template_name or request.query_params.get("template", "")
        if not chosen:
            chosen = next((t.name for t in templates if t.recommended), "")
        template = await self.backend.template(chosen, ctx.key) if chosen else None
        fields = forms.fields_of(template) if template else []
        values = values if values is not None else {}
        shown = {f.path: values.get(f.path, f.text(f.default)) for f in fields}
        ready = [v for v in versions if v.state == dpb.DATASET_VERSION_STATE_READY]
        return self.render(
            request,
            ctx,
            "train.html",
            status=status,
            templates=templates,
            template=template,
            groups=forms.groups(fields),
            tolerance=next((f for f in fields if f.path == forms.TOLERANCE), None),
            values=shown,
            form=values,
            errors=errors or {},
            general=general or [],
            versions=ready,
            models=models,
            model_types=model_types,
            field_json=lambda f: json.dumps(
                {
                    "kind": f.kind,
                    "min": f.min,
                    "max": f.max,
                    "choices": f.choices,
                    "nullable": f.nullable,
                }
            ),
        )

    async def train(self, request: Request, ctx: Ctx) -> Response:
        app = f"apps/{request.path_params['app']}"
        form = await request.form()
        values = {k: str(v) for k, v in form.items() if isinstance(v, str)}
        template_name = values.get("template", "")
        template = await self.backend.template(template_name, ctx.key)
        fields = forms.fields_of(template)
        # A browser sends no unchecked box: in the page's whole form, a missing bool is false.
        if values.get("_form") == "whole":
            for f in fields:
                if f.kind == "bool":
                    values.setdefault(f.path, "")
        overrides, _, errors = forms.overrides(fields, values)
        model_id = values.get("model", "").strip()
        dataset_version = values.get("dataset_version", "")
        if not model_id:
            errors["model"] = "enter a model id (a new model is created with it)"
        if not dataset_version:
            errors["dataset_version"] = "choose a dataset version (create one on a dataset's page)"
        if errors:
            return await self.train_page(
                request, ctx, values=values, errors=errors, status=400, template_name=template.name
            )
        try:
            model = await self.backend.ensure_model(
                app, model_id, template.model_type or values.get("model_type", ""), ctx.key
            )
            run = await self.backend.train(
                model.name,
                template.name,
                dataset_version,
                overrides,
                values.get("description", ""),
                ctx.key,
            )
        except ClientError as err:
            if err.code not in (
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.PERMISSION_DENIED,
            ):
                raise
            by_field, rest = forms.violations_by_field(err.fields)
            if not by_field:
                rest = [error_text(err), *rest]
            return await self.train_page(
                request,
                ctx,
                values=values,
                errors=by_field,
                general=rest,
                status=status_of(err),
                template_name=template.name,
            )
        return RedirectResponse(f"/{run.name}", 303)

    async def runs_page(self, request: Request, ctx: Ctx) -> Response:
        app = f"apps/{request.path_params['app']}"
        runs = await self.backend.runs(app, ctx.key)
        return self.render(request, ctx, "runs.html", runs=runs)

    async def run_page(self, request: Request, ctx: Ctx) -> Response:
        mv = await self.backend.model_version(self._run_name(request), ctx.key)
        return self.render(
            request,
            ctx,
            "run.html",
            run=mv,
            final=run_state(mv) in FINAL_STATES,
            metrics=sorted(mv.metrics.items()),
            params=json.dumps(json_format.MessageToDict(mv.param_overrides), indent=2),
        )

    async def run_events(self, request: Request, ctx: Ctx) -> Response:
        """The run's events as SSE, resuming after `Last-Event-ID` (or `?after=`)."""
        name = self._run_name(request)
        after = events.resume_point(
            request.headers.get("last-event-id"), request.query_params.get("after")
        )
        stream = self._event_stream(name, after, ctx.key)
        try:
            await self.backend.model_version(name, ctx.key)  # a refusal before the stream starts
        except ClientError as err:
            if err.code != grpc.StatusCode.UNAVAILABLE:
                raise
            stream = self._retry_soon()  # an error status would stop the browser's retries
        return StreamingResponse(
            stream,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @staticmethod
    async def _retry_soon() -> AsyncIterator[bytes]:
        yield b"retry: 1000\n: the trainer is not reachable; reconnect\n\n"

    async def _event_stream(self, name: str, after: int, key: str) -> AsyncIterator[bytes]:
        """The watch as SSE. It ends with an `end` event once the run is over; a watch that
        breaks off before (the trainer restarting, unreachable) just ends the response, so
        the browser reconnects in a second with `Last-Event-ID` and nothing is lost."""
        yield b"retry: 1000\n\n"
        queue: asyncio.Queue[tpb.TrainingEvent | ClientError | None] = asyncio.Queue()

        async def read() -> None:
            try:
                async for event in self.backend.watch(name, after, key):
                    queue.put_nowait(event)
            except ClientError as err:
                queue.put_nowait(err)
            queue.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), events.KEEPALIVE_SECONDS)
                except TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                if item is None:
                    try:
                        mv = await self.backend.model_version(name, key)
                    except ClientError:
                        return  # the browser reconnects and asks again
                    if run_state(mv) in FINAL_STATES:
                        yield events.sse(
                            {"state": run_state(mv), "status_code": mv.status_code}, event="end"
                        )
                    # Otherwise the watch broke off early (a trainer restarting): the browser
                    # reconnects with the last id it saw, and the watch resumes after it.
                    return
                if isinstance(item, ClientError):
                    if item.code == grpc.StatusCode.UNAVAILABLE:
                        return  # the browser reconnects, as for a watch that broke off
                    yield events.sse(
                        {"message": error_text(item), "code": item.code.name}, event="failure"
                    )
                    return
                yield events.sse(events.event_payload(item), id=item.sequence)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def cancel(self, request: Request, ctx: Ctx) -> Response:
        name = self._run_name(request)
        await self.backend.cancel(name, ctx.key)
        return self._back(f"/{name}", "Cancel requested.")
