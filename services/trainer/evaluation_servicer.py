"""TrainerService's evaluation RPCs: protobuf messages to `evaluations.py` calls and back.

`EvaluationRpcs` is a base of `TrainerServicer`, kept apart so the servicer of runs
and the servicer of evaluations each stay one screenful of conversions.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from loraforge.predictor.v1 import predictor_service_pb2 as ppb
from loraforge.services.common.pages import decode_token, encode_token
from loraforge.services.common.resources import page_size, timestamp
from loraforge.services.common.rpc import Context
from loraforge.services.trainer.evaluation_store import (
    CANCELLED,
    FAILED,
    RUNNING,
    SUCCEEDED,
    Result,
)
from loraforge.services.trainer.evaluations import (
    Evaluations,
    NewEvaluation,
    check_name,
    check_parent,
    inference_params,
    label_aliases,
)
from loraforge.services.trainer.store import EvaluationRow
from loraforge.trainer.v1 import evaluation_pb2 as pb
from loraforge.trainer.v1 import trainer_service_pb2_grpc as pb_grpc

STATES = {
    RUNNING: pb.EVALUATION_STATE_RUNNING,
    SUCCEEDED: pb.EVALUATION_STATE_SUCCEEDED,
    FAILED: pb.EVALUATION_STATE_FAILED,
    CANCELLED: pb.EVALUATION_STATE_CANCELLED,
}


def evaluation_to_pb(row: EvaluationRow) -> pb.Evaluation:
    message = pb.Evaluation(
        name=row.name,
        model_version=row.model_version,
        base_model=row.base_model,
        base_model_name=row.base_model_name,
        dataset_version=row.dataset_version,
        metrics=list(row.metrics),
        params=inference_params(row),
        prompt_like=row.prompt_like,
        state=STATES.get(row.state, pb.EVALUATION_STATE_UNSPECIFIED),
        progress=pb.EvaluationProgress(
            completed_examples=row.completed_examples, total_examples=row.total_examples
        ),
        scores=row.scores,
        failure_reason=row.failure_reason,
        warnings=list(row.warnings),
        create_time=timestamp(row.create_time),
        end_time=timestamp(row.end_time),
        primary_score=row.primary_score,
        label_aliases=label_aliases(row),
    )
    if row.confusion:
        message.confusion_matrix.CopyFrom(
            pb.ConfusionMatrix(
                labels=list(row.labels),
                cells=[
                    pb.ConfusionCell(reference=ref, predicted=pred, count=n)
                    for ref, pred, n in row.confusion
                ],
            )
        )
    return message


def result_to_pb(r: Result) -> pb.EvaluationResult:
    return pb.EvaluationResult(
        index=r.index,
        input=r.input_name,
        prompt=r.prompt,
        reference=r.reference,
        output=r.output,
        scores=r.scores,
        predicted_label=r.predicted_label,
        completion_tokens=r.completion_tokens,
        finish_reason=ppb.FinishReason.Value(f"FINISH_REASON_{r.finish_reason or 'UNSPECIFIED'}"),
    )


class EvaluationRpcs(pb_grpc.TrainerServiceServicer):
    """The evaluation RPCs; the servicer sets `evaluations` and `watch_poll_seconds`."""

    evaluations: Evaluations
    watch_poll_seconds: float

    async def CreateEvaluation(
        self, request: pb.CreateEvaluationRequest, context: Context
    ) -> pb.CreateEvaluationResponse:
        row = await self.evaluations.create(
            NewEvaluation(
                parent=request.parent,
                evaluation_id=request.evaluation_id,
                dataset_version=request.dataset_version,
                metrics=list(request.metrics),
                params=request.params,
                max_examples=request.max_examples,
                prompt_like=request.prompt_like,
                label_aliases=dict(request.label_aliases),
            )
        )
        return pb.CreateEvaluationResponse(evaluation=evaluation_to_pb(row))

    async def GetEvaluation(
        self, request: pb.GetEvaluationRequest, context: Context
    ) -> pb.GetEvaluationResponse:
        row = await self.evaluations.get(request.name)
        return pb.GetEvaluationResponse(evaluation=evaluation_to_pb(row))

    async def ListEvaluations(
        self, request: pb.ListEvaluationsRequest, context: Context
    ) -> pb.ListEvaluationsResponse:
        check_parent(request.parent)
        size = page_size(request.page_size)
        method = "ListEvaluations"
        position = decode_token(request.page_token, method, request.parent, ("before",))
        rows, before = await self.evaluations.page(
            request.parent, size, position["before"] if position else None
        )
        token = encode_token(method, request.parent, {"before": before}) if before else ""
        return pb.ListEvaluationsResponse(
            evaluations=[evaluation_to_pb(r) for r in rows], next_page_token=token
        )

    async def DeleteEvaluation(
        self, request: pb.DeleteEvaluationRequest, context: Context
    ) -> pb.DeleteEvaluationResponse:
        await self.evaluations.delete(request.name)
        return pb.DeleteEvaluationResponse()

    async def CancelEvaluation(
        self, request: pb.CancelEvaluationRequest, context: Context
    ) -> pb.CancelEvaluationResponse:
        row = await self.evaluations.cancel(request.name)
        return pb.CancelEvaluationResponse(evaluation=evaluation_to_pb(row))

    async def WatchEvaluation(
        self, request: pb.WatchEvaluationRequest, context: Context
    ) -> AsyncIterator[pb.WatchEvaluationResponse]:
        last: pb.Evaluation | None = None
        while True:
            current = evaluation_to_pb(await self.evaluations.get(request.name))
            if current != last:
                yield pb.WatchEvaluationResponse(evaluation=current)
                last = current
            if current.state != pb.EVALUATION_STATE_RUNNING:
                return
            await asyncio.sleep(self.watch_poll_seconds)

    async def ListEvaluationResults(
        self, request: pb.ListEvaluationResultsRequest, context: Context
    ) -> pb.ListEvaluationResultsResponse:
        check_name(request.parent, "parent")
        size = page_size(request.page_size)
        method = "ListEvaluationResults"
        position = decode_token(
            request.page_token, method, request.parent, ("offset",), filter=request.order_by
        )
        offset = position["offset"] if position else 0
        results, total = await self.evaluations.results(
            request.parent, request.order_by, offset, size
        )
        more = offset + len(results) < total
        token = (
            encode_token(
                method, request.parent, {"offset": offset + len(results)}, filter=request.order_by
            )
            if more and results
            else ""
        )
        return pb.ListEvaluationResultsResponse(
            results=[result_to_pb(r) for r in results], next_page_token=token, total_size=total
        )

    async def CompareEvaluations(
        self, request: pb.CompareEvaluationsRequest, context: Context
    ) -> pb.CompareEvaluationsResponse:
        check_name(request.evaluation, "evaluation")
        size = page_size(request.page_size)
        method = "CompareEvaluations"
        scope = f"{request.evaluation} {request.other}"
        position = decode_token(
            request.page_token, method, scope, ("offset",), filter=request.score
        )
        offset = position["offset"] if position else 0
        comparison = await self.evaluations.compare(
            request.evaluation, request.other, request.score
        )
        page = comparison.changes[offset : offset + size]
        more = offset + size < len(comparison.changes)
        token = (
            encode_token(method, scope, {"offset": offset + size}, filter=request.score)
            if more
            else ""
        )
        return pb.CompareEvaluationsResponse(
            score=comparison.score,
            better_count=comparison.better,
            worse_count=comparison.worse,
            unchanged_count=comparison.unchanged,
            scores=comparison.scores,
            other_scores=comparison.other_scores,
            changes=[
                pb.ExampleChange(
                    index=a.index,
                    input=a.input_name,
                    prompt=a.prompt,
                    reference=a.reference,
                    output=a.output,
                    other_output=b.output,
                    score=a.scores.get(comparison.score, 0.0),
                    other_score=b.scores.get(comparison.score, 0.0),
                    change=pb.CHANGE_BETTER if delta > 0 else pb.CHANGE_WORSE,
                )
                for a, b, delta in page
            ],
            next_page_token=token,
        )
