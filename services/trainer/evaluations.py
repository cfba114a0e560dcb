"""Evaluations: a model version, or the base model, scored on a held-out dataset version.

`create` checks the request and stores the evaluation RUNNING; a background task of this
trainer process then reads the dataset version (through the dataset service), asks the
predictor for each prompt's completion in batches (greedy unless told otherwise; a model
version answers with the prompt format it was trained with, as the predictor applies
it), scores each completion against the example's own (`metrics.py`, in a thread) and
stores results batch by batch, so progress is visible and nothing waits for the end.
`cancel` ends one early (CANCELLED): every write of its task is fenced on RUNNING.

A running evaluation holds a lease that its task renews. A trainer that stops gracefully
fails its running evaluations at once; one that dies leaves leases that expire, and any
trainer fails those at its start and then periodically. Either way the reason says to
create the evaluation again: an evaluation is cheap to repeat and is never resumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from loraforge.dataset.v1 import dataset_service_pb2 as dpb
from loraforge.predictor.v1 import predictor_service_pb2 as ppb
from loraforge.services.common.errors import (
    FailedPrecondition,
    FieldViolation,
    LoraforgeError,
    Unavailable,
    invalid_field,
)
from loraforge.services.common.objectstore import ObjectStore, copy_store_to_tree
from loraforge.services.common.prompts import PromptFormat
from loraforge.services.common.resources import new_id, parse_name, validate_id
from loraforge.services.predictor.params import validate_params
from loraforge.services.predictor.protos import PROMPT_FORMATS, params_from_proto
from loraforge.services.trainer import metrics
from loraforge.services.trainer.checkpoints import (
    CHECKPOINT,
    CheckpointInfo,
    get_checkpoint,
    is_checkpoint_name,
    parse_checkpoint,
)
from loraforge.services.trainer.dataset_client import AsyncDatasetClient, DatasetVersionInfo
from loraforge.services.trainer.evaluation_store import (
    FAILED,
    RUNNING,
    SUCCEEDED,
    EvaluationStore,
    Result,
)
from loraforge.services.trainer.predictor_client import AsyncPredictorClient
from loraforge.services.trainer.runs import MODEL, VERSION, run_from_row
from loraforge.services.trainer.store import EvaluationRow, State, TrainerStore, VersionRow

log = logging.getLogger("loraforge.trainer.evaluations")

VERSION_EVALUATION = VERSION + "/evaluations/{evaluation}"
CHECKPOINT_EVALUATION = CHECKPOINT + "/evaluations/{evaluation}"
BASE_EVALUATION = MODEL + "/evaluations/{evaluation}"
DATASET_VERSION = "apps/{app}/datasets/{dataset}/versions/{version}"
MAX_EXAMPLES = 100_000
# Perplexity loads the model in a process of its own (`perplexity.py`), bounded in time.
PERPLEXITY_TIMEOUT = 3600.0
BATCH_SIZE = 16  # inputs per Predict call (the predictor takes up to 128)
INTERRUPTED = (
    "interrupted: the trainer running this evaluation stopped before it finished; "
    "create the evaluation again"
)
SHUT_DOWN = (
    "interrupted: the trainer was shut down while this evaluation ran; create the evaluation again"
)
# The declared label aliases are stored beside the inference parameters, in the params JSON.
LABEL_ALIASES_KEY = "labelAliases"
ALIASES_FIELD = "label_aliases"


def inference_params(row: EvaluationRow) -> ppb.InferenceParams:
    """The inference parameters every prediction of the evaluation used."""
    doc = {k: v for k, v in row.params.items() if k != LABEL_ALIASES_KEY}
    return json_format.ParseDict(doc, ppb.InferenceParams())


def label_aliases(row: EvaluationRow) -> dict[str, str]:
    """The evaluation's label aliases, normalized: alias to label."""
    return dict(row.params.get(LABEL_ALIASES_KEY) or {})


def check_label_aliases(aliases: Mapping[str, str]) -> dict[str, str]:
    """The aliases normalized (as exact match normalizes), or INVALID_ARGUMENT naming the
    first bad entry: an empty alias or label, or an alias of more than one word."""
    checked: dict[str, str] = {}
    for alias, label in sorted(aliases.items()):
        where = f"{ALIASES_FIELD}[{alias!r}]"
        key, value = metrics.normalize(alias), metrics.normalize(label)
        if not key or not value:
            raise invalid_field(
                where,
                f"{alias!r} -> {label!r}: an alias and its label must both have a word in them "
                "(punctuation and articles do not count)",
                reason="BAD_LABEL_ALIAS",
            )
        if len(key.split()) != 1:
            raise invalid_field(
                where,
                f"{alias!r} -> {label!r}: an alias is one word (an output is read word by word)",
                reason="BAD_LABEL_ALIAS",
            )
        if checked.get(key, value) != value:
            raise invalid_field(
                where,
                f"{alias!r} is declared again for another label ({checked[key]!r} and "
                f"{value!r}); aliases compare case-insensitively",
                reason="BAD_LABEL_ALIAS",
            )
        checked[key] = value
    return checked


@dataclass(frozen=True)
class NewEvaluation:
    parent: str
    evaluation_id: str
    dataset_version: str
    metrics: list[str]
    params: ppb.InferenceParams
    max_examples: int = 0
    prompt_like: str = ""
    # For label accuracy: alias to label, as the request gave them.
    label_aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class Comparison:
    score: str
    better: int
    worse: int
    unchanged: int
    scores: dict[str, float]
    other_scores: dict[str, float]
    # (result in the first, result in the other, gain: positive is better), worse ones first.
    changes: list[tuple[Result, Result, float]]


def check_name(name: str, field: str = "name") -> str:
    """An evaluation's name, of a model version, one of its checkpoints, or a model's base
    model."""
    if "/checkpoints/" in name:
        parse_name(name, CHECKPOINT_EVALUATION, field)
    elif "/versions/" in name:
        parse_name(name, VERSION_EVALUATION, field)
    else:
        parse_name(name, BASE_EVALUATION, field)
    return name


def check_parent(parent: str, field: str = "parent") -> bool:
    """True for a model version or a checkpoint of one, False for a model (its base model);
    else INVALID_ARGUMENT."""
    if is_checkpoint_name(parent):
        parse_checkpoint(parent, field)
        return True
    if "/versions/" in parent:
        parse_name(parent, VERSION, field)
        return True
    if not parent:
        raise invalid_field(
            field,
            "is required: a model version (`apps/{app}/models/{model}/versions/{version}`), "
            "one of its checkpoints (`…/versions/{version}/checkpoints/{step}`) or a model "
            "(`apps/{app}/models/{model}`) for its base model",
            reason="MISSING_NAME",
        )
    parse_name(parent, MODEL, field)
    return False


class Evaluations:
    def __init__(
        self,
        store: TrainerStore,
        datasets: AsyncDatasetClient,
        predictor: AsyncPredictorClient,
        *,
        lease_seconds: float = 30.0,
        batch_size: int = BATCH_SIZE,
        clock: Callable[[], float] = time.time,
        objects: ObjectStore | None = None,
    ) -> None:
        self.trainer_store = store
        self.store = EvaluationStore(store)
        self.datasets = datasets
        self.predictor = predictor
        self.lease_seconds = lease_seconds
        self.batch_size = batch_size
        self.clock = clock
        # Where adapters are, for perplexity; without it perplexity is refused.
        self.objects = objects
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._reaper: asyncio.Task[None] | None = None

    # Lifecycle of the process.

    async def start(self) -> None:
        """Fails what a stopped trainer left RUNNING, now and then every half lease."""
        await self._fail_expired()
        self._reaper = asyncio.create_task(self._reap_forever())

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for name, task in list(self._tasks.items()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.to_thread(self.store.fail, name, SHUT_DOWN)

    async def _fail_expired(self) -> None:
        names = await asyncio.to_thread(self.store.fail_expired, self.clock(), INTERRUPTED)
        if names:
            log.warning("failed evaluations their trainer left running: %s", ", ".join(names))

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / 2)
            try:
                await self._fail_expired()
            except Exception:
                log.exception("failing evaluations whose trainer stopped failed; retrying later")

    # Standard methods.

    async def create(self, new: NewEvaluation) -> EvaluationRow:
        of_version = check_parent(new.parent)
        evaluation_id = (
            validate_id(new.evaluation_id, "evaluation_id") if new.evaluation_id else new_id("e")
        )
        chosen = metrics.check_metrics(new.metrics)
        aliases = check_label_aliases(new.label_aliases)
        if aliases and chosen and metrics.LABEL_ACCURACY not in chosen:
            raise invalid_field(
                ALIASES_FIELD,
                "are read by label_accuracy only; add label_accuracy to metrics or drop the "
                "aliases",
                reason="BAD_LABEL_ALIAS",
            )
        if not 0 <= new.max_examples <= MAX_EXAMPLES:
            raise invalid_field(
                "max_examples", f"must be 0 (all) to {MAX_EXAMPLES} (got {new.max_examples})"
            )
        parse_name(new.dataset_version, DATASET_VERSION, "dataset_version")
        validate_params(params_from_proto(new.params), "params")
        self.predictor.check_configured()
        params = ppb.InferenceParams()
        params.CopyFrom(new.params)
        if not params.HasField("temperature"):
            params.temperature = 0.0  # greedy, whatever the model's defaults say
        warnings: list[str] = []
        if metrics.NEEDS_MODEL.intersection(chosen):
            self._check_perplexity(of_version, new.prompt_like)
        asked = await self.datasets.get_ready_version(new.dataset_version, "dataset_version")
        if aliases:
            await self._check_alias_labels(aliases, new.dataset_version, new.max_examples)
        if of_version:
            if new.prompt_like:
                raise invalid_field(
                    "prompt_like",
                    "is only for a base-model evaluation (a model as parent); a model version "
                    "is always prompted the way it was trained",
                )
            checkpoint = await self._checkpoint(new.parent)
            version_name = checkpoint.version if checkpoint else new.parent
            version = await asyncio.to_thread(self.trainer_store.get_version, version_name)
            # A saved checkpoint serves (and is evaluated) while its run goes on.
            if checkpoint is None and version.state != State.TRAINED.value:
                raise FailedPrecondition(
                    f"model version {new.parent!r} is {version.state}; only a TRAINED version "
                    "can be evaluated",
                    reason="VERSION_NOT_TRAINED",
                    field_violations=[FieldViolation("parent", f"is {version.state}, not TRAINED")],
                )
            model_version, base_model_name = new.parent, version.base_model
            warnings += await self._check_held_out(asked, version.dataset_version, new.max_examples)
        else:
            await asyncio.to_thread(self.trainer_store.get_model, new.parent)
            model_version, base_model_name = "", ""
            if new.prompt_like:
                self._prompt_like(new, params, await self._version_of(new))
        row = EvaluationRow(
            name=f"{new.parent}/evaluations/{evaluation_id}",
            parent=new.parent,
            model_version=model_version,
            base_model=not of_version,
            base_model_name=base_model_name,
            dataset_version=new.dataset_version,
            metrics=chosen,
            params={
                **json_format.MessageToDict(params),
                **({LABEL_ALIASES_KEY: aliases} if aliases else {}),
            },
            prompt_like=new.prompt_like,
            max_examples=new.max_examples,
            state=RUNNING,
            primary_score=metrics.PRIMARY[chosen[0]] if chosen else "",
            warnings=warnings,
            create_time=self.clock(),
            lease_expires=self.clock() + self.lease_seconds,
        )
        row = await asyncio.to_thread(self.store.create, row)
        task = asyncio.create_task(self._run(row.name))
        self._tasks[row.name] = task
        name = row.name

        def forget(_task: asyncio.Task[None]) -> None:
            self._tasks.pop(name, None)

        task.add_done_callback(forget)
        return row

    async def _check_alias_labels(
        self, aliases: Mapping[str, str], dataset_version: str, max_examples: int
    ) -> None:
        """INVALID_ARGUMENT naming the first alias whose label is none of the labels the
        evaluation will read outputs as (the scored completions, normalized), or that is a
        label itself."""
        labels: set[str] = set()
        count = 0
        async for inp in self.datasets.read_inputs(dataset_version, "dataset_version"):
            if inp.example.kind == dpb.EXAMPLE_KIND_TEXT:
                continue
            if count >= (max_examples or MAX_EXAMPLES):
                break
            labels.add(metrics.normalize(inp.example.completion))
            count += 1
        if not labels:
            return  # nothing to score: the evaluation fails saying so
        known = ", ".join(repr(lab) for lab in sorted(labels)[:20])
        more = f" and {len(labels) - 20} more" if len(labels) > 20 else ""
        for alias, label in sorted(aliases.items()):
            where = f"{ALIASES_FIELD}[{alias!r}]"
            if alias in labels:
                raise invalid_field(
                    where,
                    f"{alias!r} is itself one of the labels ({known}{more}); an output that "
                    "says it is read as that label",
                    reason="BAD_LABEL_ALIAS",
                )
            if label not in labels:
                raise invalid_field(
                    where,
                    f"{alias!r} -> {label!r}: {label!r} is not one of the labels of "
                    f"{dataset_version!r}: {known}{more}",
                    reason="BAD_LABEL_ALIAS",
                )

    async def _checkpoint(self, parent: str) -> CheckpointInfo | None:
        """The checkpoint `parent` names (NOT_FOUND when it was not kept); None for a version."""
        if not is_checkpoint_name(parent):
            return None
        if self.objects is None:
            raise FailedPrecondition(
                "this trainer has no object store to find checkpoints in; evaluate the "
                "model version instead",
                reason="CHECKPOINTS_UNAVAILABLE",
            )
        version = parse_checkpoint(parent, "parent")[0]
        run = run_from_row(await asyncio.to_thread(self.trainer_store.get_version, version))
        return await asyncio.to_thread(get_checkpoint, self.objects, parent, "parent", run)

    def _check_perplexity(self, of_version: bool, prompt_like: str) -> None:
        if self.objects is None:
            raise FailedPrecondition(
                "this trainer has no object store to read adapters from, so it cannot measure "
                "perplexity or label likelihood; choose other metrics",
                reason="PERPLEXITY_UNAVAILABLE",
            )
        if not of_version and not prompt_like:
            raise invalid_field(
                "prompt_like",
                "is required for the base model's perplexity and label likelihood: the version "
                "whose prompt format and tokenization the completions are measured with",
            )

    async def _version_of(self, new: NewEvaluation) -> Any:
        parse_name(new.prompt_like, VERSION, "prompt_like")
        if not new.prompt_like.startswith(new.parent + "/versions/"):
            raise invalid_field(
                "prompt_like", f"{new.prompt_like!r} is not a version of {new.parent!r}"
            )
        return await asyncio.to_thread(self.trainer_store.get_version, new.prompt_like)

    @staticmethod
    def _prompt_like(new: NewEvaluation, params: ppb.InferenceParams, version: Any) -> None:
        """Gives the base model the version's trained prompt format and system prompt."""
        trained = PromptFormat.from_params(version.params)
        formats = {v: k for k, v in PROMPT_FORMATS.items()}
        if params.prompt_format == ppb.PROMPT_FORMAT_UNSPECIFIED:
            params.prompt_format = formats.get(trained.kind, ppb.PROMPT_FORMAT_RAW)
        if not params.system_prompt and trained.is_chat:
            params.system_prompt = trained.system_prompt

    async def _check_held_out(
        self, asked: DatasetVersionInfo, trained_on: str, max_examples: int
    ) -> list[str]:
        """Refuses the dataset version a run trained on, or one whose every scored example is
        among the rows it trained on, compared by content wherever the rows were uploaded;
        returns a warning when only some are."""
        why = ""
        dataset_version = asked.name
        if dataset_version == trained_on:
            why = "is the dataset version this model version trained on"
        else:
            try:
                trained = await self.datasets.get_ready_version(trained_on, "dataset_version")
            except LoraforgeError:
                trained = None  # deleted since: nothing to compare with
            if trained is None:
                return []
            if trained.content_sha256 == asked.content_sha256:
                why = (
                    f"has the same examples as {trained_on!r}, which this model version trained on"
                )
            else:
                overlap, scored = await self._overlap(dataset_version, trained_on, max_examples)
                shared = (
                    f"{overlap} of the {scored} examples it would score are rows of "
                    f"{trained_on!r}, which this model version trained on"
                )
                if overlap and overlap == scored:
                    why = f"has only training examples: {shared}"
                elif overlap:
                    return [f"{shared}; their scores flatter the model"]
        if why:
            raise FailedPrecondition(
                f"dataset_version {dataset_version!r} {why}; scores on training data say little "
                "about new data, so evaluate on a held-out dataset version",
                reason="DATASET_VERSION_TRAINED_ON",
                field_violations=[FieldViolation("dataset_version", why)],
            )
        return []

    async def _overlap(self, asked: str, trained_on: str, max_examples: int) -> tuple[int, int]:
        """(how many of the examples an evaluation of `asked` scores are also rows of
        `trained_on`, how many it scores), comparing each example's content."""
        scored: dict[bytes, int] = {}
        count = 0
        async for inp in self.datasets.read_inputs(asked, "dataset_version"):
            if inp.example.kind == dpb.EXAMPLE_KIND_TEXT:
                continue
            if count >= (max_examples or MAX_EXAMPLES):
                break
            key = _content_key(inp)
            scored[key] = scored.get(key, 0) + 1
            count += 1
        overlap = 0
        async for inp in self.datasets.read_inputs(trained_on, "dataset_version"):
            overlap += scored.pop(_content_key(inp), 0)
            if not scored:
                break
        return overlap, count

    async def get(self, name: str) -> EvaluationRow:
        check_name(name)
        return await asyncio.to_thread(self.store.get, name)

    async def page(
        self, parent: str, size: int, before: int | None
    ) -> tuple[list[EvaluationRow], int | None]:
        if is_checkpoint_name(parent):
            check_parent(parent)
            await self._checkpoint(parent)
        elif check_parent(parent):
            await asyncio.to_thread(self.trainer_store.get_version, parent)
        else:
            await asyncio.to_thread(self.trainer_store.get_model, parent)
        rows, more = await asyncio.to_thread(self.store.page, parent, size, before)
        return rows, (rows[-1].seq if more else None)

    async def delete(self, name: str) -> None:
        check_name(name)
        await asyncio.to_thread(self.store.delete, name)

    async def cancel(self, name: str) -> EvaluationRow:
        check_name(name)
        row = await asyncio.to_thread(self.store.cancel, name)
        task = self._tasks.get(name)
        if task is not None:  # ours: stop now rather than at the next batch
            task.cancel()
        return row

    async def results(
        self, name: str, order_by: str, offset: int, size: int
    ) -> tuple[list[Result], int]:
        row = await self.get(name)
        score, descending = self.order(row, order_by)
        return await asyncio.to_thread(self.store.results, name, score, descending, offset, size)

    @staticmethod
    def order(row: EvaluationRow, order_by: str) -> tuple[str, bool]:
        """The score and direction `order_by` names ('' : dataset order)."""
        words = order_by.split()
        if not words:
            return "", False
        score = row.primary_score if words[0] == "score" else words[0]
        best_first = words[1:] == ["desc"]
        chosen = row.metrics or list(metrics.METRICS)
        known = [name for metric in chosen for name in metrics.SCORES[metric]]
        if score not in known or len(words) > 2 or (len(words) == 2 and not best_first):
            raise invalid_field(
                "order_by",
                f"{order_by!r}: use a score name, worst first, or the name and ` desc`, best "
                f"first (`score` is the primary one); this evaluation has {', '.join(known)}",
            )
        # Worst first is ascending, but for perplexity, where lower is better.
        return score, best_first != (score in metrics.LOWER_IS_BETTER)

    async def compare(self, name: str, other: str, score: str) -> Comparison:
        first = await self.get(name)
        check_name(other, "other")
        second = await asyncio.to_thread(self.store.get, other)
        for field, row in (("evaluation", first), ("other", second)):
            if row.state != SUCCEEDED:
                raise FailedPrecondition(
                    f"evaluation {row.name!r} is {row.state}; only SUCCEEDED evaluations compare",
                    reason="EVALUATION_NOT_SUCCEEDED",
                    field_violations=[FieldViolation(field, f"is {row.state}, not SUCCEEDED")],
                )
        if first.dataset_version != second.dataset_version:
            raise FailedPrecondition(
                f"the evaluations scored different dataset versions ({first.dataset_version!r} "
                f"and {second.dataset_version!r}); compare evaluations of the same one",
                reason="DIFFERENT_DATASET_VERSIONS",
                field_violations=[
                    FieldViolation("other", f"scored {second.dataset_version!r}, not the same")
                ],
            )
        score = score or first.primary_score
        for field, row in (("score", first), ("score", second)):
            if score not in row.scores:
                raise invalid_field(
                    field,
                    f"{row.name!r} has no {score!r} score; it has {', '.join(sorted(row.scores))}",
                )
        a, b = await asyncio.gather(
            asyncio.to_thread(self.store.all_results, first.name),
            asyncio.to_thread(self.store.all_results, second.name),
        )
        theirs = {r.index: r for r in b}
        better = worse = unchanged = 0
        changes: list[tuple[Result, Result, float]] = []
        for mine in a:
            match = theirs.get(mine.index)
            if match is None or match.input_name != mine.input_name:
                continue
            if score not in mine.scores or score not in match.scores:
                continue  # e.g. too long for perplexity
            delta = match.scores[score] - mine.scores[score]
            if score in metrics.LOWER_IS_BETTER:
                delta = -delta  # the gain: positive is better
            if abs(delta) < 1e-9:
                unchanged += 1
                continue
            if delta > 0:
                better += 1
            else:
                worse += 1
            changes.append((mine, match, delta))
        # Worse ones first, most lost first; then better ones, most gained first.
        changes.sort(key=lambda c: (c[2] > 0, -abs(c[2]), c[0].index))
        return Comparison(score, better, worse, unchanged, first.scores, second.scores, changes)

    # The background task.

    async def _run(self, name: str) -> None:
        renewer = asyncio.create_task(self._renew_forever(name))
        try:
            await self._evaluate(name)
        except asyncio.CancelledError:
            raise
        except LoraforgeError as err:
            log.warning("evaluation %s failed: %s", name, err.message)
            await asyncio.to_thread(self.store.fail, name, err.message)
        except Exception:
            incident = uuid.uuid4().hex[:12]
            log.exception("evaluation %s failed unexpectedly (incident %s)", name, incident)
            await asyncio.to_thread(
                self.store.fail,
                name,
                f"an unexpected error stopped it (incident {incident}); the trainer's log has "
                "the details",
            )
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer

    async def _renew_forever(self, name: str) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            try:
                if not await asyncio.to_thread(
                    self.store.renew, name, self.clock() + self.lease_seconds
                ):
                    return
            except Exception:
                log.exception("renewing the lease of evaluation %s failed", name)

    async def _evaluate(self, name: str) -> None:
        row = await asyncio.to_thread(self.store.get, name)
        examples: list[tuple[int, dpb.Input]] = []
        skipped = 0
        capped = False
        async for index, inp in _enumerate(
            self.datasets.read_inputs(row.dataset_version, "dataset_version")
        ):
            if inp.example.kind == dpb.EXAMPLE_KIND_TEXT:
                skipped += 1
                continue
            if len(examples) >= (row.max_examples or MAX_EXAMPLES):
                capped = not row.max_examples
                break
            examples.append((index, inp))
        warnings = list(row.warnings)
        if capped:
            warnings.append(
                f"the dataset version has more than {MAX_EXAMPLES} prompt-completion examples; "
                f"the first {MAX_EXAMPLES} were scored"
            )
        if skipped:
            warnings.append(
                f"{skipped} plain-text example(s) have no completion to compare with and "
                "were skipped"
            )
        if not examples:
            raise FailedPrecondition(
                f"dataset version {row.dataset_version!r} has no prompt-completion examples "
                "to score"
            )
        references = [inp.example.completion for _, inp in examples]
        chosen = list(row.metrics) or metrics.default_metrics(references)
        labels = sorted({metrics.normalize(r) for r in references})
        if metrics.LABEL_ACCURACY in chosen and not metrics.are_labels(references):
            warnings.append(
                f"label_accuracy: the completions are not short labels ({len(labels)} distinct); "
                "exact_match or rouge may say more"
            )
        base_model_name = row.base_model_name or await self.predictor.base_model()
        if not await asyncio.to_thread(
            self.store.start,
            name,
            metrics=chosen,
            primary_score=metrics.PRIMARY[chosen[0]],
            total_examples=len(examples),
            base_model_name=base_model_name,
        ):
            return  # deleted or failed meanwhile
        aliases = label_aliases(row)
        if aliases and metrics.LABEL_ACCURACY not in chosen:
            warnings.append(
                "label_aliases: not used, since label_accuracy was not computed (the "
                "completions are not short labels)"
            )
        scorer = metrics.Scorer(chosen, labels=labels, aliases=aliases)
        likelihoods: list[tuple[float, int] | None] = [None] * len(examples)
        prompts = [inp.example.prompt for _, inp in examples]
        if metrics.PERPLEXITY in chosen:
            likelihoods = await self._likelihoods(row, list(zip(prompts, references, strict=True)))
            too_long = likelihoods.count(None)
            if too_long:
                warnings.append(
                    f"perplexity: {too_long} example(s) are longer than the version's "
                    "model_max_length and have none"
                )
        likeliest: list[str | None] = [None] * len(examples)
        if metrics.LABEL_LIKELIHOOD in chosen:
            if not metrics.are_labels(references):
                warnings.append(
                    f"label_likelihood: the completions are not short labels ({len(labels)} "
                    "distinct); each was scored as a choice among all of them"
                )
            likeliest = await self._likeliest(row, prompts, references)
        params = inference_params(row)
        for start in range(0, len(examples), self.batch_size):
            batch = examples[start : start + self.batch_size]
            outputs = await self.predictor.predict(
                row.model_version, [inp.example.prompt for _, inp in batch], params
            )
            end = start + self.batch_size
            results = await asyncio.to_thread(
                _score, scorer, batch, outputs, likelihoods[start:end], likeliest[start:end]
            )
            stored = await asyncio.to_thread(
                self.store.add_results, name, results, self.clock() + self.lease_seconds
            )
            if not stored:
                return  # deleted or failed meanwhile
        confusion: list[list[Any]] = []
        if metrics.LABEL_ACCURACY in chosen:
            confusion = [[ref, pred, n] for (ref, pred), n in sorted(scorer.confusion.items())]
        aggregates = await asyncio.to_thread(scorer.aggregates, len(examples))
        await asyncio.to_thread(
            self.store.succeed,
            name,
            aggregates,
            scorer.confusion_labels() if confusion else [],
            confusion,
            warnings,
        )
        log.info("evaluation %s succeeded: %s", name, aggregates)

    async def _likeliest(
        self, row: EvaluationRow, prompts: Sequence[str], references: Sequence[str]
    ) -> list[str | None]:
        """For each prompt, the candidate label whose tokens the evaluated model finds
        likeliest after it (the highest summed log-likelihood, as lm-evaluation-harness
        scores multiple choice), among the references' labels, each in the spelling the
        references use most; None where no candidate could be measured."""
        spellings: dict[str, Counter[str]] = {}
        for reference in references:
            spellings.setdefault(metrics.normalize(reference), Counter())[reference] += 1
        candidates = [forms.most_common(1)[0][0] for _, forms in sorted(spellings.items())]
        pairs = [(prompt, candidate) for prompt in prompts for candidate in candidates]
        found = await self._likelihoods(row, pairs)
        likeliest: list[str | None] = []
        for i in range(len(prompts)):
            measured = [
                (nll[0], candidate)
                for candidate, nll in zip(
                    candidates, found[i * len(candidates) : (i + 1) * len(candidates)], strict=True
                )
                if nll is not None
            ]
            likeliest.append(min(measured)[1] if measured else None)
        return likeliest

    async def _likelihoods(
        self, row: EvaluationRow, pairs: Sequence[tuple[str, str]]
    ) -> list[tuple[float, int] | None]:
        """The completions' (nll, tokens) after their prompts under the evaluated model, by
        teacher forcing in a process of its own; None for a pair too long to measure."""
        checkpoint = await self._checkpoint(row.model_version) if row.model_version else None
        version = await asyncio.to_thread(
            self.trainer_store.get_version,
            checkpoint.version if checkpoint else row.model_version or row.prompt_like,
        )
        with tempfile.TemporaryDirectory(prefix="loraforge-perplexity-") as scratch:
            folder = Path(scratch)
            await asyncio.to_thread(_write_inputs, folder, version, pairs)
            args = [
                *("--params", str(folder / "params.json")),
                *("--examples", str(folder / "examples.jsonl")),
                *("--out", str(folder / "out.jsonl")),
                *("--base-model", version.base_model),
            ]
            if row.model_version:  # the version's own adapter; the base model has none
                assert self.objects is not None
                prefix = checkpoint.prefix if checkpoint else version.adapter_prefix
                await asyncio.to_thread(
                    copy_store_to_tree, self.objects, prefix, folder / "adapter"
                )
                args += ["--adapter", str(folder / "adapter")]
            proc = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "loraforge.services.trainer.perplexity", *args),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                _, err = await asyncio.wait_for(proc.communicate(), PERPLEXITY_TIMEOUT)
            except BaseException:  # timed out, or the evaluation was cancelled
                proc.kill()
                await proc.wait()
                raise
            if proc.returncode != 0:
                lines = err.decode(errors="replace").strip().splitlines()
                why = lines[-1] if lines else f"exit status {proc.returncode}"
                raise Unavailable(f"measuring perplexity failed: {why}")
            text = await asyncio.to_thread((folder / "out.jsonl").read_text)
            found = [json.loads(line) for line in text.splitlines()]
        return [None if f is None else (float(f["nll"]), int(f["tokens"])) for f in found]


def _write_inputs(folder: Path, version: VersionRow, pairs: Sequence[tuple[str, str]]) -> None:
    (folder / "params.json").write_text(json.dumps(version.params))
    with open(folder / "examples.jsonl", "w") as out:
        for prompt, completion in pairs:
            out.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")


def _content_key(inp: dpb.Input) -> bytes:
    """What identifies an example by its content, whichever dataset or upload holds it."""
    digest = hashlib.blake2b(digest_size=16)
    for part in (str(inp.example.kind), inp.example.prompt, inp.example.completion):
        data = part.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.digest()


async def _enumerate(items: AsyncIterator[dpb.Input]) -> AsyncIterator[tuple[int, dpb.Input]]:
    index = 0
    async for item in items:
        yield index, item
        index += 1


def _score(
    scorer: metrics.Scorer,
    batch: list[tuple[int, dpb.Input]],
    outputs: list[ppb.PredictOutput],
    likelihoods: list[tuple[float, int] | None],
    likeliest: list[str | None],
) -> list[Result]:
    results = []
    for (index, inp), out, likelihood, choice in zip(
        batch, outputs, likelihoods, likeliest, strict=True
    ):
        scored = scorer.score(out.text, inp.example.completion, likelihood, choice)
        results.append(
            Result(
                index=index,
                input_name=inp.name,
                prompt=inp.example.prompt,
                reference=inp.example.completion,
                output=out.text,
                scores=scored.scores,
                predicted_label=scored.predicted_label,
                completion_tokens=out.completion_tokens,
                finish_reason=ppb.FinishReason.Name(out.finish_reason).removeprefix(
                    "FINISH_REASON_"
                ),
            )
        )
    return results


__all__ = ["FAILED", "RUNNING", "SUCCEEDED", "Comparison", "Evaluations", "NewEvaluation"]
