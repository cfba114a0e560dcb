"""The playground: the base model and a fine-tuned version answering one prompt, streamed
side by side with the same inference parameters."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from google.protobuf import json_format
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from loraforge.client.client import ClientError
from loraforge.predictor.v1 import predictor_service_pb2 as ppb
from loraforge.services.console import events
from loraforge.services.console.web import Ctx, Web, error_text, run_state


class PlaygroundPages(Web):
    """The playground page and its stream of two answers."""

    async def playground_page(self, request: Request, ctx: Ctx) -> Response:
        app = f"apps/{request.path_params['app']}"
        runs = await self.backend.runs(app, ctx.key)
        trained = [r for r in runs if run_state(r) == "TRAINED"]
        chosen = request.query_params.get("version", "") or (trained[0].name if trained else "")
        run = next((r for r in trained if r.name == chosen), None)
        tokenizer = json_format.MessageToDict(run.params).get("tokenizer_config", {}) if run else {}
        return self.render(
            request,
            ctx,
            "playground.html",
            trained=trained,
            chosen=run.name if run else "",
            system_prompt=str(tokenizer.get("system_prompt", "")),
            prompt_format=str(tokenizer.get("prompt_format", "")),
        )

    async def playground_stream(self, request: Request, ctx: Ctx) -> Response:
        """The base model's and a fine-tuned version's answers to one prompt, with the same
        inference parameters, as one SSE stream of `{side, delta}` events."""
        form = await request.form()
        version = str(form.get("version", ""))
        errors: dict[str, str] = {}
        params = ppb.InferenceParams(system_prompt=str(form.get("system_prompt", "")))
        fmt = str(form.get("prompt_format", ""))
        params.prompt_format = {"raw": ppb.PROMPT_FORMAT_RAW, "chat": ppb.PROMPT_FORMAT_CHAT}.get(
            fmt, ppb.PROMPT_FORMAT_UNSPECIFIED
        )
        for name, kind in (("temperature", float), ("max_tokens", int), ("top_p", float)):
            raw = str(form.get(name, "")).strip()
            if not raw:
                continue
            try:
                setattr(params, name, kind(raw))
            except ValueError:
                errors[name] = f"{raw!r} is not a {'whole ' if kind is int else ''}number"
        prompt = str(form.get("prompt", ""))
        if not prompt.strip():
            errors["prompt"] = "enter a prompt"
        if not version:
            errors["version"] = "choose a fine-tuned version (train one first)"
        if errors:
            return JSONResponse({"error": "check the marked fields", "fields": errors}, 400)
        sides = {"base": "", "tuned": version}
        return StreamingResponse(
            self._answers(sides, prompt, params, ctx.key),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _answers(
        self, sides: dict[str, str], prompt: str, params: ppb.InferenceParams, key: str
    ) -> AsyncIterator[bytes]:
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()

        async def answer(side: str, model: str) -> None:
            try:
                async for r in self.backend.predict_stream(model, prompt, params, key):
                    queue.put_nowait(
                        events.sse(
                            {
                                "side": side,
                                "delta": r.delta,
                                "model_version": r.model_version,
                                "finish_reason": ppb.FinishReason.Name(r.finish_reason)
                                .removeprefix("FINISH_REASON_")
                                .lower()
                                if r.finish_reason
                                else "",
                                "completion_tokens": r.completion_tokens,
                            }
                        )
                    )
            except ClientError as err:
                by_field = {
                    f.removeprefix("params."): d for f, d in err.fields if f.startswith("params.")
                }
                queue.put_nowait(
                    events.sse(
                        {"side": side, "message": error_text(err), "fields": by_field},
                        event="failure",
                    )
                )
            finally:
                queue.put_nowait(None)

        tasks = [asyncio.create_task(answer(s, m)) for s, m in sides.items()]
        open_sides = len(tasks)
        try:
            while open_sides:
                item = await queue.get()
                if item is None:
                    open_sides -= 1
                else:
                    yield item
            yield events.sse({}, event="done")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
