"""Data pages: apps, datasets, uploads with their reports, previews and versions."""

from __future__ import annotations

import asyncio
import contextlib
import math
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from loraforge.client.client import ClientError
from loraforge.dataset.v1 import dataset_service_pb2 as dpb
from loraforge.services.console.web import PAGE_ROWS, Ctx, Web, error_text, short_name, status_of

PREVIEW_ROWS = 10
HISTOGRAM_SAMPLE = 1000
HISTOGRAM_BINS = 12


def histogram(lengths: list[int], bins: int = HISTOGRAM_BINS) -> list[dict[str, Any]]:
    """Equal-width bins over the lengths: [{low, high, count, height (0..1)}]."""
    if not lengths:
        return []
    low, high = min(lengths), max(lengths)
    bins = max(1, min(bins, high - low + 1))
    width = max(1, math.ceil((high - low + 1) / bins))
    counts = [0] * bins
    for n in lengths:
        counts[min(bins - 1, (n - low) // width)] += 1
    while counts and counts[-1] == 0:
        counts.pop()
    top = max(counts) or 1
    return [
        {"low": low + i * width, "high": low + (i + 1) * width - 1, "count": c, "height": c / top}
        for i, c in enumerate(counts)
    ]


async def _file_chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(1 << 20):
        yield chunk


class TooLarge(Exception):
    pass


async def _body_chunks(request: Request, limit: int) -> AsyncIterator[bytes]:
    sent = 0
    async for chunk in request.stream():
        sent += len(chunk)
        if sent > limit:
            raise TooLarge(f"the file is larger than this console accepts ({limit} bytes)")
        if chunk:
            yield chunk


class DataPages(Web):
    """Apps, datasets, uploads and versions."""

    async def apps_page(
        self, request: Request, ctx: Ctx, errors: dict[str, str] | None = None, status: int = 200
    ) -> Response:
        apps = await self.backend.apps(ctx.key)
        return self.render(
            request, ctx, "apps.html", status=status, apps=apps, errors=errors or {}, form={}
        )

    async def create_app(self, request: Request, ctx: Ctx) -> Response:
        form = await request.form()
        app_id = str(form.get("app_id", "")).strip()
        try:
            await self.backend.create_app(app_id, str(form.get("description", "")), ctx.key)
        except ClientError as err:
            if err.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS):
                errors = {f: d for f, d in err.fields} or {"app_id": err.message}
                errors = {
                    ("app_id" if f in ("app_id", "name") else f): d for f, d in errors.items()
                }
                return await self.apps_page(request, ctx, errors, status_of(err))
            raise
        return self._back(f"/apps/{app_id}", f"Created app {app_id}.")

    async def app_page(
        self, request: Request, ctx: Ctx, errors: dict[str, str] | None = None, status: int = 200
    ) -> Response:
        name = f"apps/{request.path_params['app']}"
        app, datasets, runs = await asyncio.gather(
            self.backend.app(name, ctx.key),
            self.backend.datasets_of(name, ctx.key),
            self.backend.runs(name, ctx.key),
        )
        return self.render(
            request,
            ctx,
            "app.html",
            status=status,
            app=app,
            datasets=datasets,
            runs=runs[:10],
            errors=errors or {},
        )

    async def _confirm_delete(
        self,
        request: Request,
        ctx: Ctx,
        what: str,
        name: str,
        delete: Callable[[], Awaitable[None]],
        back: str,
        done: str,
    ) -> Response:
        if request.method == "GET":
            return self.render(request, ctx, "confirm_delete.html", what=what, name=name, back=back)
        await delete()
        return self._back(done, f"Deleted {what} {short_name(name) if what != 'app' else name}.")

    async def delete_app(self, request: Request, ctx: Ctx) -> Response:
        name = f"apps/{request.path_params['app']}"
        await self.backend.app(name, ctx.key)
        return await self._confirm_delete(
            request,
            ctx,
            "app",
            name,
            lambda: self.backend.delete_app(name, ctx.key),
            f"/{name}",
            "/",
        )

    async def create_dataset(self, request: Request, ctx: Ctx) -> Response:
        app = request.path_params["app"]
        form = await request.form()
        dataset_id = str(form.get("dataset_id", "")).strip()
        try:
            await self.backend.create_dataset(
                f"apps/{app}", dataset_id, str(form.get("description", "")), ctx.key
            )
        except ClientError as err:
            if err.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS):
                errors = {f: d for f, d in err.fields} or {"dataset_id": err.message}
                errors = {
                    ("dataset_id" if f in ("dataset_id", "name") else f): d
                    for f, d in errors.items()
                }
                return await self.app_page(request, ctx, errors, status_of(err))
            raise
        return self._back(f"/apps/{app}/datasets/{dataset_id}", f"Created dataset {dataset_id}.")

    async def delete_dataset(self, request: Request, ctx: Ctx) -> Response:
        app, dataset = request.path_params["app"], request.path_params["dataset"]
        name = f"apps/{app}/datasets/{dataset}"
        await self.backend.dataset(name, ctx.key)
        return await self._confirm_delete(
            request,
            ctx,
            "dataset",
            name,
            lambda: self.backend.delete_dataset(name, ctx.key),
            f"/{name}",
            f"/apps/{app}",
        )

    async def dataset_page(self, request: Request, ctx: Ctx) -> Response:
        name = f"apps/{request.path_params['app']}/datasets/{request.path_params['dataset']}"
        dataset, versions, inputs = await asyncio.gather(
            self.backend.dataset(name, ctx.key),
            self.backend.versions(name, ctx.key),
            self.backend.inputs(name, HISTOGRAM_SAMPLE, ctx.key),
        )
        report, page, pages = None, 1, 1
        upload_id = request.query_params.get("upload", "")
        kept = ctx.session.uploads.get(upload_id)
        if kept is not None and kept[0] == name:
            report = kept[1]
            pages = max(1, math.ceil(len(report.row_errors) / PAGE_ROWS))
            with contextlib.suppress(ValueError):
                page = min(pages, max(1, int(request.query_params.get("page", "1"))))
        lengths = [len(i.example.prompt) + len(i.example.completion) for i in inputs.inputs]
        return self.render(
            request,
            ctx,
            "dataset.html",
            dataset=dataset,
            versions=versions,
            preview=list(inputs.inputs[:PREVIEW_ROWS]),
            total=inputs.total_size or dataset.input_count,
            histogram=histogram(lengths),
            sampled=len(lengths),
            report=report,
            format_name=lambda f: dpb.SourceFormat.Name(f).removeprefix("SOURCE_FORMAT_"),
            version_state=lambda s: dpb.DatasetVersionState.Name(s).removeprefix(
                "DATASET_VERSION_STATE_"
            ),
            rows=list(report.row_errors[(page - 1) * PAGE_ROWS : page * PAGE_ROWS])
            if report
            else [],
            page=page,
            pages=pages,
            upload_id=upload_id,
        )

    async def upload(self, request: Request, ctx: Ctx) -> Response:
        """A file into a dataset: the page's script sends the raw file (`X-File-Name` names
        it), a plain form sends multipart; either way it is streamed on, never held whole."""
        name = f"apps/{request.path_params['app']}/datasets/{request.path_params['dataset']}"
        scripted = request.headers.get("x-file-name") is not None
        try:
            if scripted:
                file_name = urllib.parse.unquote(request.headers["x-file-name"])
                skip = request.headers.get("x-skip-duplicates", "") == "true"
                chunks = _body_chunks(request, self.config.max_upload_bytes)
            else:
                form: FormData = await request.form(max_part_size=self.config.max_upload_bytes)
                file = form.get("file")
                if not isinstance(file, UploadFile) or not file.filename:
                    raise ClientError(grpc.StatusCode.INVALID_ARGUMENT, "choose a file to upload")
                file_name, skip = file.filename, form.get("skip_duplicates") == "on"
                chunks = _file_chunks(file)
            report = await self.backend.upload(name, file_name, chunks, ctx.key, skip)
        except (ClientError, TooLarge) as err:
            if (
                isinstance(err, ClientError)
                and err.code
                in (
                    grpc.StatusCode.UNAUTHENTICATED,
                    grpc.StatusCode.NOT_FOUND,
                )
                and not scripted
            ):
                raise
            message = error_text(err) if isinstance(err, ClientError) else str(err)
            if scripted:
                return JSONResponse({"error": message}, 400)
            return self._back(f"/{name}", message)
        ctx.session.keep_upload(name, report)
        target = f"/{name}?upload={urllib.parse.quote(report.upload_id)}#report"
        if scripted:
            return JSONResponse({"redirect": target})
        return RedirectResponse(target, 303)

    async def create_version(self, request: Request, ctx: Ctx) -> Response:
        name = f"apps/{request.path_params['app']}/datasets/{request.path_params['dataset']}"
        form = await request.form()
        try:
            version = await self.backend.create_version(
                name, str(form.get("description", "")), ctx.key
            )
        except ClientError as err:
            if err.code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT):
                return self._back(f"/{name}", error_text(err))
            raise
        stats = version.stats
        return self._back(
            f"/{name}",
            f"Created version {version.name.rsplit('/', 1)[-1]}: {stats.example_count} examples.",
        )
