"""The training function: validation, completion-only labels, packing isolation, determinism, resume."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from loraforge.services.trainer import templates as tpl
from loraforge.services.trainer import training
from loraforge.services.trainer.params import TrainingParams
from loraforge.services.trainer.training import IGNORE_INDEX, TrainingExample
from tests.tiny_model import build_tiny_model

EXAMPLES = [
    TrainingExample(f"Question: what is {i} plus {i}? Answer:", f" {2 * i}", ref=f"line {i + 1}")
    for i in range(40)
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")


def params_for(model: Path, peft: dict[str, Any] | None = None, **trainer: Any) -> TrainingParams:
    template = tpl.get_template("templates/HF_Llama_3_2_1b_instruct_lora")
    return tpl.resolve_params(
        template,
        {
            "model_config": {"pretrained_model_name_or_path": str(model)},
            "tokenizer_config": {"model_max_length": 64},
            "peft_config": peft or {},
            "trainer_config": {
                "max_steps": 12,
                "logging_steps": 4,
                "save_steps": 6,
                "per_device_train_batch_size": 4,
                "learning_rate": 1e-3,
                **trainer,
            },
        },
    )


def test_labels_cover_only_completions_unless_asked(tiny_model: Path) -> None:
    params = params_for(tiny_model)
    tokenizer = training.load_tokenizer(params)
    examples = [
        TrainingExample("Question: 1 plus 1? Answer:", " 2", ref="a"),
        TrainingExample("", "The quick brown fox.", is_text=True, ref="b"),
    ]
    (pc, text), invalid = training.tokenize_examples(tokenizer, examples, params)
    assert invalid == []
    prompt_len = len(tokenizer("Question: 1 plus 1? Answer:")["input_ids"])
    assert pc.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert pc.labels[prompt_len:] == pc.input_ids[prompt_len:]
    assert pc.input_ids[-1] == tokenizer.eos_token_id
    assert text.labels == text.input_ids  # plain text: every token is learned
    params = dataclasses.replace(
        params,
        trainer_config=dataclasses.replace(params.trainer_config, completion_only_loss=False),
    )
    (full, _), _ = training.tokenize_examples(tokenizer, examples, params)
    assert full.labels == full.input_ids


def test_rows_invalid_for_the_tokenizer_count_against_the_tolerance(tiny_model: Path) -> None:
    params = params_for(tiny_model)
    tokenizer = training.load_tokenizer(params)
    examples = [
        *EXAMPLES[:8],
        TrainingExample("Question: long?", " word" * 200, ref="line 9"),
        TrainingExample("Question: empty?", "", ref="line 10"),
    ]
    features, invalid = training.tokenize_examples(tokenizer, examples, params)
    assert len(features) == 8
    assert [r.ref for r in invalid] == ["line 9", "line 10"]
    assert "longer than model_max_length 64" in invalid[0].reason
    assert "no completion tokens" in invalid[1].reason
    training.check_tolerance(len(examples), invalid, 20)  # 2 of 10 = 20%: allowed
    with pytest.raises(training.ToleranceExceeded) as info:
        training.check_tolerance(len(examples), invalid, 5)
    assert (
        "2 of 10" in str(info.value)
        and "line 9" in str(info.value)
        and "line 10" in str(info.value)
    )


def test_packed_examples_cannot_see_each_other(tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    params = params_for(tiny_model)
    tokenizer = training.load_tokenizer(params)
    features, _ = training.tokenize_examples(tokenizer, EXAMPLES[:9], params)
    rows = training.pack(features, 64)
    assert len(rows) < len(features)
    assert all(row.length <= 64 for row in rows)
    assert sorted(id(f) for row in rows for f in row.examples) == sorted(id(f) for f in features)
    batch = training.PackedCollator(tokenizer.pad_token_id)(rows[:2])
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 2
    assert int(batch.pop(training.REAL_TOKENS)) == rows[0].length + rows[1].length
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
        # The same rows without restarting positions leak across examples.
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits
        for slot, row in enumerate(rows[:2]):
            offset = 0
            for f in row.examples:
                alone = model(input_ids=torch.tensor([f.input_ids]), use_cache=False).logits[0]
                n = len(f.input_ids)
                torch.testing.assert_close(
                    packed[slot, offset : offset + n], alone, atol=1e-4, rtol=1e-4
                )
                assert (
                    batch["labels"][slot, offset].item() == IGNORE_INDEX
                )  # never predict the next example's start
                offset += n
            assert (batch["labels"][slot, offset:] == IGNORE_INDEX).all()  # padding learns nothing
        assert not torch.allclose(
            packed[0, : rows[0].length], leaky[0, : rows[0].length], atol=1e-4
        )


def _adapter(result: training.TrainingResult) -> dict[str, torch.Tensor]:
    return load_file(result.adapter_dir / "adapter_model.safetensors")


def test_same_seed_same_adapter_and_resume_matches_an_uninterrupted_run(
    tiny_model: Path, tmp_path: Path
) -> None:
    kept = tmp_path / "kept"

    class Keep(training.QuietReporter):
        def __init__(self) -> None:
            self.progress_events: list[dict[str, Any]] = []

        def progress(self, progress: dict[str, Any]) -> None:
            self.progress_events.append(progress)

        def checkpoint_saved(self, step: int, folder: Path) -> None:
            if step == 6:
                shutil.copytree(folder, kept / folder.name)

    params = params_for(tiny_model)
    reporter = Keep()
    first = training.run_training(params, EXAMPLES, tmp_path / "a", reporter)
    again = training.run_training(params, EXAMPLES, tmp_path / "b")
    resumed = training.run_training(
        params, EXAMPLES, tmp_path / "c", resume_from=kept / "checkpoint-6"
    )
    a, b, c = _adapter(first), _adapter(again), _adapter(resumed)
    assert first.global_step == resumed.global_step == 12 and resumed.resumed_from_step == 6
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)  # it learned something
    assert "eval_loss" in first.metrics and first.metrics["train_tokens"] > 0
    events = reporter.progress_events
    last = events[-1]
    assert last["step"] == last["total_steps"] == 12 and last["tokens_per_second"] > 0
    assert {"learning_rate", "epoch", "eta_seconds"} <= set(last)
    # Each loss comes once, in the event of the log that measured it.
    evals = [e["step"] for e in events if "eval_loss" in e]
    trains = [e["step"] for e in events if "train_loss" in e]
    assert evals and trains and len(set(evals)) == len(evals) and len(set(trains)) == len(trains)
    assert not any("eval_loss" in e and "train_loss" in e for e in events)


def test_packing_trains_and_a_stop_request_stops(tiny_model: Path, tmp_path: Path) -> None:
    packed = training.run_training(
        params_for(tiny_model, packing=True, max_steps=3), EXAMPLES, tmp_path / "p"
    )
    assert packed.global_step == 3 and packed.metrics["train_loss"] > 0

    class StopAfterFirstStep(training.QuietReporter):
        calls = 0

        def should_stop(self) -> bool:
            self.calls += 1
            return self.calls > 1

    with pytest.raises(training.TrainingStopped):
        training.run_training(
            params_for(tiny_model), EXAMPLES, tmp_path / "s", StopAfterFirstStep()
        )


class _Recorder(training.QuietReporter):
    def __init__(self) -> None:
        self.progress_events: list[dict[str, Any]] = []

    def progress(self, progress: dict[str, Any]) -> None:
        self.progress_events.append(progress)


def test_the_chosen_parameters_reach_the_trainer_the_optimizer_and_the_adapter(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Values no template uses by default, so a default anywhere on the way would show."""
    params = params_for(
        tiny_model,
        peft={
            "r": 4,
            "lora_alpha": 12,
            "lora_dropout": 0.2,
            "target_modules": ["q_proj", "v_proj"],
        },
        max_steps=-1,
        num_train_epochs=2,
        per_device_train_batch_size=5,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        warmup_ratio=0,
        eval_split_percent=0,
        logging_steps=1,
        save_steps=1000,
    )
    args = training.training_arguments(params, tmp_path / "args", has_eval=False)
    assert (args.learning_rate, args.num_train_epochs, args.per_device_train_batch_size) == (
        3e-3,
        2.0,
        5,
    )
    assert args.max_steps == -1 and args.lr_scheduler_type == "constant"

    reporter = _Recorder()
    result = training.run_training(params, EXAMPLES, tmp_path / "run", reporter)
    # 40 examples in batches of 5 for 2 epochs: the batch size and the epochs were used.
    assert result.total_steps == result.global_step == 2 * math.ceil(len(EXAMPLES) / 5)
    assert reporter.progress_events[-1]["epoch"] == pytest.approx(2.0)
    # The optimizer stepped at the chosen rate (a constant schedule keeps it there).
    rates = [event["learning_rate"] for event in reporter.progress_events]
    assert len(rates) >= result.global_step and rates == [pytest.approx(3e-3)] * len(rates)

    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 12, 0.2)
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    weights = _adapter(result)
    assert {k.split(".")[-3] for k in weights} == {"q_proj", "v_proj"}
    assert all(v.shape[0] == 4 for k, v in weights.items() if "lora_A" in k)


def test_the_loss_on_labelled_positions_alone_equals_the_models_own_loss(tiny_model: Path) -> None:
    # Long prompts, short completions: a classifier's batch, where the logits of the labelled
    # positions alone are a small part of the full ones.
    params = params_for(tiny_model, max_steps=1)
    tokenizer = training.load_tokenizer(params)
    examples = [
        TrainingExample("Review: " + "a fine film " * (3 + 2 * i) + "Label:", " pos", ref=str(i))
        for i in range(4)
    ]
    features, invalid = training.tokenize_examples(tokenizer, examples, params)
    assert invalid == []
    batch = training.PaddingCollator(tokenizer.pad_token_id)(features)
    batch.pop(training.REAL_TOKENS, None)
    keep = training.labelled_positions(batch["labels"])
    assert keep is not None and 0 < keep.numel() * 4 < batch["labels"].shape[1]
    model = training.load_model(params).eval()  # no LoRA dropout: both passes see the same
    trainer = training._make_trainer_class()(
        model=model, args=training.training_arguments(params, tiny_model.parent / "out", False)
    )
    expected = model(**batch).loss
    got = trainer.compute_loss(model, dict(batch))
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    expected.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    trainer.compute_loss(model, dict(batch)).backward()
    for name, grad in want.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad)


def test_a_long_prompt_is_cut_in_its_middle_and_the_completion_kept_whole(
    tiny_model: Path,
) -> None:
    params = params_for(tiny_model)  # model_max_length 64
    tokenizer = training.load_tokenizer(params)
    prompt = "Review: the start of it. " + "and then more words " * 40 + "The end. Label:"
    long = TrainingExample(prompt, " negative", ref="long")
    short = TrainingExample("Review: short. Label:", " positive", ref="short")
    (cut, kept), invalid = training.tokenize_examples(tokenizer, [long, short], params)
    assert invalid == [] and cut.truncated and not kept.truncated
    assert len(cut.input_ids) == 64
    completion = tokenizer(" negative", add_special_tokens=False)["input_ids"]
    end = [tokenizer.eos_token_id]
    assert cut.input_ids[-len(completion) - 1 :] == completion + end
    labelled = [t for t, label in zip(cut.input_ids, cut.labels, strict=True) if label != -100]
    assert labelled == completion + end  # only the completion is learned
    text = tokenizer.decode(cut.input_ids)
    assert "Review: the start" in text and "The end. Label:" in text and "…" in text

    def tokenize_with(mode: str) -> tuple[list[training.Feature], list[training.InvalidRow]]:
        changed = dataclasses.replace(
            params,
            tokenizer_config=dataclasses.replace(params.tokenizer_config, truncation=mode),
        )
        return training.tokenize_examples(tokenizer, [long, short], changed)

    (start_cut, _), _ = tokenize_with("prompt_start")
    text = tokenizer.decode(start_cut.input_ids)
    assert "Review: the start" not in text and "The end. Label:" in text
    features, invalid = tokenize_with("drop")
    assert [f.truncated for f in features] == [False] and [r.ref for r in invalid] == ["long"]


def test_a_completion_that_leaves_no_room_for_the_prompt_is_still_an_invalid_row(
    tiny_model: Path,
) -> None:
    params = params_for(tiny_model)
    tokenizer = training.load_tokenizer(params)
    examples = [TrainingExample("Question: long?", " word" * 200, ref="line 1")]
    features, invalid = training.tokenize_examples(tokenizer, examples, params)
    assert features == [] and [r.ref for r in invalid] == ["line 1"]
    assert "completion alone leaves the prompt under" in invalid[0].reason


def test_runs_stored_before_truncation_existed_keep_dropping_long_examples() -> None:
    template = tpl.get_template("templates/HF_Llama_3_2_1b_instruct_lora")
    stored = template.defaults().to_dict()
    del stored["tokenizer_config"]["truncation"]
    assert tpl.stored_params(template.resource_name, stored).tokenizer_config.truncation == "drop"
    assert template.defaults().tokenizer_config.truncation == "prompt_middle"


class LogReporter(training.QuietReporter):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def log(self, message: str, level: str = "INFO") -> None:
        self.lines.append(message)


def test_a_run_too_big_for_the_memory_it_has_trains_smaller_micro_batches_of_the_same_batch(
    tiny_model: Path, tmp_path: Path
) -> None:
    from loraforge.services.trainer.estimates import peak_memory

    params = params_for(tiny_model, max_steps=3)  # micro-batch 4, no accumulation
    smallest = dataclasses.replace(
        params,
        trainer_config=dataclasses.replace(
            params.trainer_config,
            per_device_train_batch_size=1,
            gradient_accumulation_steps=4,
            gradient_checkpointing=True,
        ),
    )
    longest = max(
        len(f.input_ids)
        for f in training.tokenize_examples(training.load_tokenizer(params), EXAMPLES, params)[0]
    )
    budget = peak_memory(smallest, str(tiny_model), longest, False, 4) + 1
    assert budget < peak_memory(params, str(tiny_model), longest, False, 4)
    reporter = LogReporter()
    planned = training.run_training(
        params, EXAMPLES, tmp_path / "planned", reporter, memory_limit=budget
    )
    plan = [line for line in reporter.lines if "this worker has" in line]
    assert len(plan) == 1, reporter.lines
    assert "micro-batch 1 x 4 accumulation steps" in plan[0]
    assert "the same global batch of 4" in plan[0] and "gradient checkpointing on" in plan[0]
    unplanned = training.run_training(params, EXAMPLES, tmp_path / "unplanned", memory_limit=0)
    assert planned.global_step == unplanned.global_step == 3
    # The same examples in each optimizer step: the trained tokens match.
    assert planned.train_tokens == unplanned.train_tokens
