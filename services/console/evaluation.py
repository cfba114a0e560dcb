"""Evaluation pages: a trained version scored on held-out data, beside the base model."""

from __future__ import annotations

import asyncio

import grpc
from starlette.requests import Request
from starlette.responses import Response

from loraforge.client.client import ClientError
from loraforge.dataset.v1 import dataset_service_pb2 as dpb
from loraforge.services.console.web import (
    PAGE_ROWS,
    Ctx,
    Web,
    error_text,
    evaluation_state,
    status_of,
)
from loraforge.trainer.v1 import evaluation_pb2 as epb


class EvaluationPages(Web):
    """A version's evaluations, a form for more, and one evaluation beside another."""

    async def evaluations_page(
        self, request: Request, ctx: Ctx, errors: dict[str, str] | None = None, status: int = 200
    ) -> Response:
        """A version's evaluations, the base model's prompted like it, and a form for more."""
        name = self._run_name(request)
        model = name.rsplit("/versions/", 1)[0]
        app = f"apps/{request.path_params['app']}"
        mv, own, base, versions = await asyncio.gather(
            self.backend.model_version(name, ctx.key),
            self.backend.evaluations(name, ctx.key),
            self.backend.evaluations(model, ctx.key),
            self.backend.app_versions(app, ctx.key),
        )
        return self.render(
            request,
            ctx,
            "evaluations.html",
            status=status,
            run=mv,
            evaluations=own + [e for e in base if e.prompt_like == name],
            versions=[v for v in versions if v.state == dpb.DATASET_VERSION_STATE_READY],
            errors=errors or {},
            eval_state=evaluation_state,
        )

    async def evaluate(self, request: Request, ctx: Ctx) -> Response:
        """Scores the version, and the base model prompted like it, on one dataset version."""
        name = self._run_name(request)
        form = await request.form()
        dataset_version = str(form.get("dataset_version", ""))
        raw = str(form.get("max_examples", "")).strip() or "0"
        # ASCII digits only ("²".isdigit() is true), and no more than the field holds: the
        # trainer then says what the limit is.
        if not (raw.isascii() and raw.isdigit()) or len(raw) > 9:
            return await self.evaluations_page(
                request,
                ctx,
                {"max_examples": f"{raw[:40]!r} is not a whole number from 0 to 999,999,999"},
                400,
            )
        limit = int(raw)
        try:
            mine = await self.backend.create_evaluation(name, dataset_version, limit, "", ctx.key)
            other = ""
            if form.get("with_base") == "on":
                model = name.rsplit("/versions/", 1)[0]
                base = await self.backend.create_evaluation(
                    model, dataset_version, limit, name, ctx.key
                )
                other = base.name
        except ClientError as err:
            if err.code not in (
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.NOT_FOUND,
            ):
                raise
            errors = {f: d for f, d in err.fields if f in ("dataset_version", "max_examples")}
            return await self.evaluations_page(
                request, ctx, errors or {"general": error_text(err)}, status_of(err)
            )
        return self._back(f"/{mine.name}", vs=other)

    async def evaluation_page(self, request: Request, ctx: Ctx) -> Response:
        """An evaluation: state, scores, its worst results, and the comparison with `?vs=`."""
        name = request.url.path.lstrip("/")
        other = request.query_params.get("vs", "")
        evaluation = await self.backend.evaluation(name, ctx.key)
        done = evaluation_state(evaluation.state) == "SUCCEEDED"
        results = await self.backend.results(name, PAGE_ROWS, ctx.key) if done else None
        comparison, other_eval = None, None
        if other:
            other_eval = await self.backend.evaluation(other, ctx.key)
            if done and evaluation_state(other_eval.state) == "SUCCEEDED":
                # From the other one to this one: "better" is this one scoring higher.
                comparison = await self.backend.compare(other, name, PAGE_ROWS, ctx.key)
        running = any(
            e is not None and evaluation_state(e.state) == "RUNNING"
            for e in (evaluation, other_eval)
        )
        return self.render(
            request,
            ctx,
            "evaluation.html",
            evaluation=evaluation,
            other=other_eval,
            results=results,
            comparison=comparison,
            running=running,
            eval_state=evaluation_state,
            change=lambda c: epb.Change.Name(c).removeprefix("CHANGE_").lower(),
            scores=lambda e: sorted(e.scores.items()),
        )
