"""Scores of generated completions against reference completions.

ROUGE comes from Google's `rouge-score` (F-measure, Porter stemming) and BLEU from
`sacrebleu` (sentence BLEU per example, corpus BLEU overall, 0 to 100), so the figures
are the ones those libraries give anyone. Exact match normalizes as SQuAD's official
script does (lowercase, no punctuation, no articles, single spaces). Label accuracy reads
an output as one of the references' labels (its first label-like words: the label, a
declared alias, or an abbreviation such as `neg` for `negative`) and keeps a confusion
matrix. Label likelihood reads no output: it takes the label whose tokens the model finds
likeliest after the prompt (lm-evaluation-harness's multiple choice), so a model that knows
the answer but not the format gets its real score.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import sacrebleu
from rouge_score import rouge_scorer

from loraforge.services.common.errors import FieldViolation, InvalidArgument

EXACT_MATCH = "exact_match"
LABEL_ACCURACY = "label_accuracy"
# Label accuracy by likelihood: the label the model finds likeliest after the prompt.
LABEL_LIKELIHOOD = "label_likelihood"
ROUGE = "rouge"
BLEU = "bleu"
PERPLEXITY = "perplexity"
METRICS = (EXACT_MATCH, LABEL_ACCURACY, LABEL_LIKELIHOOD, ROUGE, BLEU, PERPLEXITY)
# Metrics that need the model's own forward pass (a process that loads it), not generations.
NEEDS_MODEL = frozenset({PERPLEXITY, LABEL_LIKELIHOOD})
# Scores where lower is better; for the others higher is.
LOWER_IS_BETTER = frozenset({PERPLEXITY})
ROUGE_SCORES = ("rouge1", "rouge2", "rougeL")
# The score each metric contributes per example, and the one results sort by.
SCORES = {
    EXACT_MATCH: (EXACT_MATCH,),
    LABEL_ACCURACY: (LABEL_ACCURACY,),
    LABEL_LIKELIHOOD: (LABEL_LIKELIHOOD,),
    ROUGE: ROUGE_SCORES,
    BLEU: (BLEU,),
    PERPLEXITY: (PERPLEXITY,),
}
PRIMARY = {
    EXACT_MATCH: EXACT_MATCH,
    LABEL_ACCURACY: LABEL_ACCURACY,
    LABEL_LIKELIHOOD: LABEL_LIKELIHOOD,
    ROUGE: "rougeL",
    BLEU: BLEU,
    PERPLEXITY: PERPLEXITY,
}
OTHER_LABEL = "(other)"
# With label accuracy: the share of the most common expected label (a majority-class baseline).
MAJORITY_LABEL_RATE = "majority_label_rate"
# Completions count as labels when each is this short and there are few distinct ones.
MAX_LABEL_WORDS = 4
MAX_LABELS = 50

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """SQuAD's answer normalization: lowercase, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def perplexity(nll: float, tokens: int) -> float:
    """exp of the mean negative log-likelihood per token (nats)."""
    return math.exp(nll / tokens) if tokens else math.inf


def check_metrics(metrics: Sequence[str], field_name: str = "metrics") -> list[str]:
    """The metrics asked for, in order, without repeats; INVALID_ARGUMENT for an unknown one."""
    chosen: list[str] = []
    for i, metric in enumerate(metrics):
        if metric not in METRICS:
            where = f"{field_name}[{i}]"
            description = f"{metric!r} is not a metric; choose from {', '.join(METRICS)}"
            raise InvalidArgument(
                f"{where}: {description}",
                reason="UNKNOWN_METRIC",
                field_violations=[FieldViolation(where, description)],
            )
        if metric not in chosen:
            chosen.append(metric)
    return chosen


def are_labels(references: Sequence[str]) -> bool:
    """Whether the references look like class labels: short, and few distinct ones."""
    labels = {normalize(r) for r in references}
    return (
        bool(references)
        and all(0 < len(label.split()) <= MAX_LABEL_WORDS for label in labels)
        and len(labels) <= min(MAX_LABELS, max(2, len(references) // 2))
    )


def default_metrics(references: Sequence[str]) -> list[str]:
    """Label accuracy first for a classifier's labels (n-gram overlap says nothing of a
    one-word label: ROUGE's stemmer matches `negative` to `neg` but not `positive` to
    `pos`), exact match, ROUGE and BLEU for generated text."""
    if are_labels(references):
        return [LABEL_ACCURACY, EXACT_MATCH]
    return [EXACT_MATCH, ROUGE, BLEU]


# A word of an output is read as a one-word label it abbreviates or spells out (`neg` for
# `negative`, `negative` for `neg`) when both have at least this many letters and no
# other label fits it so.
MIN_ABBREVIATION = 3


def read_label(output: str, labels: Sequence[str], aliases: Mapping[str, str] | None = None) -> str:
    """The label `output` gives: one of `labels` (normalized), or OTHER_LABEL.

    The first label-like words of the normalized output say it: a label's own words (the
    longest label that fits wins, so `very positive` is not read as `positive`), a declared
    alias (`aliases`: normalized alias to label), or one word that abbreviates or spells out
    exactly one one-word label (`neg`, `negative`). So `positive.`, `positive, because ...`
    and `The news is positive.` are `positive`; a base model that answers in words is read
    as fairly as one trained to answer with the label itself.
    """
    words = normalize(output).split()
    ordered = sorted(labels, key=lambda lab: -len(lab.split()))
    one_word = [lab for lab in labels if len(lab.split()) == 1]
    declared = {normalize(alias): normalize(label) for alias, label in (aliases or {}).items()}
    for i, word in enumerate(words):
        for label in ordered:
            size = len(label.split())
            if words[i : i + size] == label.split():
                return label
        if declared.get(word) in labels:
            return declared[word]
        fits = [
            lab
            for lab in one_word
            if min(len(word), len(lab)) >= MIN_ABBREVIATION
            and (word.startswith(lab) or lab.startswith(word))
        ]
        if len(fits) == 1:
            return fits[0]
    return OTHER_LABEL


@dataclass
class Scored:
    """One example's scores and, with label accuracy, the label its output was read as."""

    scores: dict[str, float]
    predicted_label: str = ""


@dataclass
class Scorer:
    """Scores examples one batch at a time and keeps what the aggregates need.

    `labels`: the normalized references' labels, needed for label accuracy.
    """

    metrics: list[str]
    labels: list[str] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)  # alias -> label, for label accuracy
    outputs: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    sums: Counter[str] = field(default_factory=Counter)
    confusion: Counter[tuple[str, str]] = field(default_factory=Counter)
    # Perplexity: the summed negative log-likelihood and token count over all examples.
    nll: float = 0.0
    tokens: int = 0

    def __post_init__(self) -> None:
        self._rouge = (
            rouge_scorer.RougeScorer(list(ROUGE_SCORES), use_stemmer=True)
            if ROUGE in self.metrics
            else None
        )

    @property
    def primary(self) -> str:
        return PRIMARY[self.metrics[0]]

    def score(
        self,
        output: str,
        reference: str,
        likelihood: tuple[float, int] | None = None,
        likeliest: str | None = None,
    ) -> Scored:
        """Scores one output; `likelihood`: the reference's (nll, tokens), for perplexity;
        `likeliest`: the label the model finds likeliest after the prompt, for
        label_likelihood."""
        scores: dict[str, float] = {}
        predicted = ""
        if LABEL_LIKELIHOOD in self.metrics and likeliest is not None:
            scores[LABEL_LIKELIHOOD] = float(normalize(likeliest) == normalize(reference))
        if EXACT_MATCH in self.metrics:
            scores[EXACT_MATCH] = float(normalize(output) == normalize(reference))
        if LABEL_ACCURACY in self.metrics:
            predicted = read_label(output, self.labels, self.aliases)
            expected = normalize(reference)
            scores[LABEL_ACCURACY] = float(predicted == expected)
            self.confusion[(expected, predicted)] += 1
        if self._rouge is not None:
            rouge = self._rouge.score(reference, output)
            for name in ROUGE_SCORES:
                scores[name] = float(rouge[name].fmeasure)
        if BLEU in self.metrics:
            scores[BLEU] = float(sacrebleu.sentence_bleu(output, [reference]).score)
            self.outputs.append(output)
            self.references.append(reference)
        self.sums.update(scores)
        if PERPLEXITY in self.metrics and likelihood is not None:
            scores[PERPLEXITY] = perplexity(*likelihood)
            self.nll += likelihood[0]
            self.tokens += likelihood[1]
        return Scored(scores, predicted)

    def aggregates(self, count: int) -> dict[str, float]:
        """Means over `count` scored examples, and corpus BLEU over all of them."""
        if count == 0:
            return {}
        means = {name: total / count for name, total in self.sums.items()}
        if LABEL_ACCURACY in self.metrics and self.confusion:
            # What always answering the most common label would score: the bar a
            # classifier's label accuracy has to clear.
            expected = Counter[str]()
            for (label, _), n in self.confusion.items():
                expected[label] += n
            means[MAJORITY_LABEL_RATE] = max(expected.values()) / sum(expected.values())
        if BLEU in self.metrics:
            means[BLEU] = float(sacrebleu.corpus_bleu(self.outputs, [self.references]).score)
        if PERPLEXITY in self.metrics and self.tokens:
            means[PERPLEXITY] = perplexity(self.nll, self.tokens)  # per token, over all
        return means

    def confusion_labels(self) -> list[str]:
        seen = {p for _, p in self.confusion}
        return sorted(self.labels) + ([OTHER_LABEL] if OTHER_LABEL in seen else [])
