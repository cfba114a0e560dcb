"""Evaluation metrics on fixed examples, against the libraries' own results.

ROUGE must be what `rouge-score` gives (F-measure, stemming) and BLEU what `sacrebleu`
gives (sentence BLEU per example, corpus BLEU overall); exact match normalizes as
SQuAD's script does; label accuracy reads outputs as labels and counts a confusion
matrix. No services here: `tests/test_evaluations.py` runs evaluations end to end.
"""

from __future__ import annotations

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from loraforge.services.common.errors import InvalidArgument
from loraforge.services.common.policy import POLICY
from loraforge.services.trainer import metrics

PAIRS = [
    ("The cat sat on the mat.", "the cat sat on the mat"),
    ("A dog ran in the park", "the dogs were running in a park"),
    ("positive", "Positive."),
    ("nothing alike here", "completely different words"),
]


def test_rouge_and_bleu_are_the_libraries_own_figures() -> None:
    scorer = metrics.Scorer([metrics.ROUGE, metrics.BLEU])
    rouge = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for output, reference in PAIRS:
        scores = scorer.score(output, reference).scores
        expected = rouge.score(reference, output)
        for name in ("rouge1", "rouge2", "rougeL"):
            assert scores[name] == pytest.approx(expected[name].fmeasure)
        assert scores["bleu"] == pytest.approx(sacrebleu.sentence_bleu(output, [reference]).score)
    aggregates = scorer.aggregates(len(PAIRS))
    outputs, references = zip(*PAIRS, strict=True)
    corpus = sacrebleu.corpus_bleu(list(outputs), [list(references)]).score
    assert aggregates["bleu"] == pytest.approx(corpus)
    mean_l = sum(rouge.score(r, o)["rougeL"].fmeasure for o, r in PAIRS) / len(PAIRS)
    assert aggregates["rougeL"] == pytest.approx(mean_l)
    # Porter stemming: "dogs" is "dog".
    assert scorer.score("dogs", "dog").scores["rouge1"] == pytest.approx(1.0)


def test_exact_match_ignores_case_punctuation_articles_and_spacing() -> None:
    scorer = metrics.Scorer([metrics.EXACT_MATCH])
    assert [scorer.score(o, r).scores["exact_match"] for o, r in PAIRS] == [1.0, 0.0, 1.0, 0.0]
    assert metrics.normalize("  The  Answer: 42! ") == "answer 42"
    assert scorer.aggregates(4) == {"exact_match": 0.5}


def test_label_accuracy_reads_outputs_as_labels_and_counts_a_confusion_matrix() -> None:
    references = ["positive", "negative", "neutral", "positive", "negative", "positive"]
    outputs = ["Positive.", "negative, because sales fell", "positive", "no idea", "negative", "P"]
    assert metrics.are_labels(references)
    # A classifier is judged by its labels; n-gram overlap says nothing of one-word labels.
    assert metrics.default_metrics(references) == ["label_accuracy", "exact_match"]
    labels = sorted({metrics.normalize(r) for r in references})
    scorer = metrics.Scorer([metrics.LABEL_ACCURACY], labels=labels)
    read = [scorer.score(o, r) for o, r in zip(outputs, references, strict=True)]
    assert [s.predicted_label for s in read] == [
        "positive",
        "negative",
        "positive",
        "(other)",
        "negative",
        "(other)",
    ]
    # Beside it, what always answering the most common label (positive, 3 of 6) would score.
    assert scorer.aggregates(6) == {
        "label_accuracy": pytest.approx(3 / 6),
        "majority_label_rate": pytest.approx(3 / 6),
    }
    assert scorer.confusion[("neutral", "positive")] == 1
    assert scorer.confusion[("positive", "(other)")] == 2
    assert scorer.confusion_labels() == ["negative", "neutral", "positive", "(other)"]
    # The longest label that fits wins.
    assert metrics.read_label("very positive!", ["positive", "very positive"]) == "very positive"


def test_long_free_text_completions_are_not_labels() -> None:
    references = [f"a sentence of many words number {i} that goes on" for i in range(10)]
    assert not metrics.are_labels(references)
    assert metrics.default_metrics(references) == ["exact_match", "rouge", "bleu"]


def test_an_unknown_metric_is_refused_naming_its_place_in_the_list() -> None:
    assert metrics.check_metrics(["bleu", "rouge", "bleu"]) == ["bleu", "rouge"]
    with pytest.raises(InvalidArgument) as info:
        metrics.check_metrics(["rouge", "accuracy"])
    assert info.value.reason == "UNKNOWN_METRIC"
    assert [v.field for v in info.value.field_violations] == ["metrics[1]"]
    assert "exact_match, label_accuracy, label_likelihood, rouge, bleu" in info.value.message


def test_the_trainer_may_read_dataset_versions_and_predict_with_its_own_identity() -> None:
    for rpc in ("Predict", "GetServingInfo"):
        assert "trainer" in POLICY[f"/loraforge.predictor.v1.PredictorService/{rpc}"].services
    read = POLICY["/loraforge.dataset.v1.DatasetService/ReadDatasetVersion"]
    assert "trainer" in read.services


def test_label_accuracy_reads_the_first_label_like_word_its_abbreviations_and_aliases() -> None:
    labels = ["neg", "pos"]
    # A base model that answers in words, counted by hand: 5 of the 7 say the right label.
    outputs = [
        ("negative", "neg"),  # spelled out
        ("The review is Positive.", "pos"),  # the first label-like word
        ("POS", "pos"),  # case
        ("I think it is negative, not positive", "neg"),  # the first one counts
        ("The film", "pos"),  # no label
        ("nothing to say", "neg"),  # "no..." is too short to abbreviate anything
        ("positively great", "pos"),
    ]
    scorer = metrics.Scorer([metrics.LABEL_ACCURACY], labels=labels)
    read = [scorer.score(o, r).predicted_label for o, r in outputs]
    assert read == ["neg", "pos", "pos", "neg", "(other)", "(other)", "pos"]
    assert scorer.aggregates(len(outputs))["label_accuracy"] == pytest.approx(5 / 7)
    # An abbreviation two labels share is no label; a declared alias decides.
    assert metrics.read_label("neutr", ["neutral", "neutron"]) == "(other)"
    assert metrics.read_label("meh", ["pos", "neg", "neutral"], {"meh": "neutral"}) == "neutral"
    assert metrics.read_label("meh", ["pos", "neg"], {"meh": "neutral"}) == "(other)"
