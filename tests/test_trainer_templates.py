"""Templates are data with typed, bounded, documented parameters; overrides are validated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format, struct_pb2

from loraforge.services.common.errors import InvalidArgument
from loraforge.services.trainer import hardware
from loraforge.services.trainer import templates as tpl
from loraforge.services.trainer.hardware import Capabilities, LiveWorker, Requirements
from loraforge.services.trainer.params import TrainingParams

SEED_TEMPLATES = {
    "HF_GPTNeo_125m_lora",
    "HF_GPTNeo_2p7b_lora",
    "HF_Llama_2_7b_chat_GPTQ_lora",
    "HF_Llama_2_13b_chat_GPTQ_lora",
    "HF_Llama_3_1_8b_instruct_GPTQ_lora",
    "HF_Mistral_7b_instruct_GPTQ_lora",
    "HF_Mistral_7b_lora",
    "HuggingFace_AdvancedConfig",
}


@pytest.mark.parametrize(
    ("cuda", "recommended"),
    [(True, "HF_Llama_3_1_8b_instruct_GPTQ_lora"), (False, "HF_SmolLM2_135m_instruct_lora")],
)
def test_the_template_recommended_first_depends_on_cuda(
    monkeypatch: pytest.MonkeyPatch, cuda: bool, recommended: str
) -> None:
    monkeypatch.setattr(tpl, "_cuda_available", lambda: cuda)
    names = [t.name for t in tpl.all_templates()]
    assert SEED_TEMPLATES <= set(names)
    assert {"HF_Qwen2_5_0p5b_instruct_lora", "HF_SmolLM2_135m_instruct_lora"} <= set(names)
    assert names[0] == recommended
    assert [t.name for t in tpl.all_templates() if t.recommended] == [recommended]


def test_chat_prompt_format_is_a_choice_and_a_system_prompt_needs_it() -> None:
    smol = tpl.get_template("templates/HF_SmolLM2_135m_instruct_lora")
    assert smol.defaults().tokenizer_config.prompt_format == "chat"
    assert smol.defaults().model_config.pretrained_model_name_or_path == (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    advanced = tpl.get_template("templates/HuggingFace_AdvancedConfig")
    assert advanced.defaults().tokenizer_config.prompt_format == "raw"
    with pytest.raises(InvalidArgument) as info:
        tpl.resolve_params(advanced, {"tokenizer_config": {"system_prompt": "Be brief."}})
    assert [v.field for v in info.value.field_violations] == [
        "param_overrides.tokenizer_config.system_prompt"
    ]
    params = tpl.resolve_params(
        advanced, {"tokenizer_config": {"prompt_format": "chat", "system_prompt": "Be brief."}}
    )
    assert params.tokenizer_config.system_prompt == "Be brief."
    assert params.tokenizer_config.prompt().is_chat


@pytest.mark.parametrize("template", tpl.all_templates(), ids=lambda t: t.name)
def test_every_parameter_is_typed_bounded_and_documented(template: tpl.Template) -> None:
    groups = {p.path.split(".")[0] for p in template.parameters}
    assert groups == {*tpl.GROUPS, tpl.TOLERANCE}
    for p in template.parameters:
        assert p.type in tpl.PARAMETER_TYPES and len(p.description) > 15, p.path
        assert tpl.check_value(p, p.default) is None, p.path
        if p.type in ("int", "float"):
            assert p.min is not None and p.max is not None, p.path
        if p.type == "choice":
            assert p.default in p.choices
    tolerance = template.parameter(tpl.TOLERANCE)
    assert tolerance and (tolerance.min, tolerance.max, tolerance.default) == (0, 100, 5)
    assert template.hardware.summary
    gptq = "GPTQ" in template.name
    assert template.hardware.requires_gptq == gptq and template.hardware.requires_cuda == gptq
    assert template.serving_engine == ("transformers" if "GPTNeo" in template.name else "vllm")


def test_overrides_apply_over_defaults_with_struct_numbers_normalised() -> None:
    t = tpl.get_template("templates/HF_Qwen2_5_0p5b_instruct_lora")
    params = tpl.resolve_params(
        t, {"peft_config": {"r": 8.0, "target_modules": ["q_proj"]}, tpl.TOLERANCE: 20.0}
    )
    assert params.peft_config.r == 8 and isinstance(params.peft_config.r, int)
    assert params.peft_config.target_modules == ("q_proj",)
    assert params.peft_config.lora_alpha == 32.0  # untouched default
    assert params.invalid_data_tolerance_percent == 20.0
    assert t.defaults().peft_config.r == 16  # defaults are not mutated


def test_bad_overrides_name_every_field_path() -> None:
    t = tpl.get_template("templates/HF_GPTNeo_125m_lora")
    with pytest.raises(InvalidArgument) as info:
        tpl.resolve_params(
            t,
            {
                "peft_config": {"r": 0, "rank": 4, "lora_dropout": "high"},
                "trainer_config": {"lr_scheduler_type": "exotic", "max_steps": 2.5},
                "training": {},
                tpl.TOLERANCE: 101,
            },
        )
    fields = {v.field: v.description for v in info.value.field_violations}
    assert fields.keys() == {
        "param_overrides.peft_config.r",
        "param_overrides.peft_config.rank",
        "param_overrides.peft_config.lora_dropout",
        "param_overrides.trainer_config.lr_scheduler_type",
        "param_overrides.trainer_config.max_steps",
        "param_overrides.training",
        "param_overrides.invalid_data_tolerance_percent",
    }
    assert "at least 1" in fields["param_overrides.peft_config.r"]
    assert "unknown parameter" in fields["param_overrides.peft_config.rank"]
    assert "whole number" in fields["param_overrides.trainer_config.max_steps"]
    assert "param_overrides.peft_config.r" in info.value.message


def test_unknown_template_is_not_found() -> None:
    with pytest.raises(Exception) as info:
        tpl.get_template("templates/NoSuchTemplate", "template")
    assert info.value.field_violations[0].field == "template"  # type: ignore[attr-defined]
    with pytest.raises(InvalidArgument):
        tpl.get_template("NoSuchTemplate", "template")


def test_a_run_needs_what_its_template_declares_and_a_gptq_base_needs_cuda_too() -> None:
    gptq = tpl.get_template("templates/HF_Llama_3_1_8b_instruct_GPTQ_lora")
    needs = tpl.requirements(gptq, gptq.defaults())
    assert needs == Requirements(
        cuda=True, gptq=True, gpu_memory_gib=gptq.hardware.min_gpu_memory_gib
    )
    assert needs.gpu_memory_gib > 0
    assert hardware.unmet(needs, Capabilities()) == [
        f"a CUDA GPU of at least {needs.gpu_memory_gib:g} GiB",
        "GPTQModel",
    ]
    assert hardware.unmet(needs, Capabilities(cuda=True, gpu_memory_gib=80, gptq=True)) == []
    small = Capabilities(cuda=True, gpu_memory_gib=needs.gpu_memory_gib / 2, gptq=True)
    assert hardware.unmet(needs, small) == [f"a CUDA GPU of at least {needs.gpu_memory_gib:g} GiB"]
    # A CPU template asks for nothing, not even the GPU memory it would take on a GPU.
    smol = tpl.get_template("templates/HF_SmolLM2_135m_instruct_lora")
    assert tpl.requirements(smol, smol.defaults()) == Requirements()
    # A non-GPTQ template asking for a GPTQ base is held to the same requirements.
    advanced = tpl.get_template("templates/HuggingFace_AdvancedConfig")
    assert not tpl.requirements(advanced, advanced.defaults()).gptq
    params = tpl.resolve_params(advanced, {"quantization_config": {"quant_method": "gptq"}})
    assert tpl.requirements(advanced, params).cuda and tpl.requirements(advanced, params).gptq
    # This machine's own lack is the same check, against what it has.
    assert tpl.missing_requirements(gptq, gptq.defaults()) == hardware.unmet(
        needs, hardware.probe()
    )


def _live(*capabilities: Capabilities) -> list[LiveWorker]:
    return [LiveWorker(f"w{i + 1}", c) for i, c in enumerate(capabilities)]


def test_a_waiting_run_says_what_it_needs_and_what_the_live_workers_lack() -> None:
    both = Requirements(cuda=True, gptq=True)
    gpu = Capabilities(cuda=True, gpu_memory_gib=24)
    assert hardware.waiting_reason(both, _live(Capabilities())) == (
        "waiting for a worker with a CUDA GPU and GPTQModel; the 1 live worker has neither"
    )
    assert hardware.waiting_reason(both, _live(Capabilities(), Capabilities())) == (
        "waiting for a worker with a CUDA GPU and GPTQModel; the 2 live workers have neither"
    )
    assert hardware.waiting_reason(both, _live(gpu)) == (
        "waiting for a worker with a CUDA GPU and GPTQModel; the 1 live worker lacks GPTQModel"
    )
    assert hardware.waiting_reason(both, _live(gpu, Capabilities(), gpu)) == (
        "waiting for a worker with a CUDA GPU and GPTQModel; none of the 3 live workers can "
        "take it (w1, w3 lack GPTQModel; w2 lacks a CUDA GPU and GPTQModel)"
    )
    big = Requirements(cuda=True, gpu_memory_gib=40)
    assert hardware.waiting_reason(big, _live(gpu)) == (
        "waiting for a worker with a CUDA GPU of at least 40 GiB; the 1 live worker "
        "lacks a CUDA GPU of at least 40 GiB"
    )
    assert "no worker is live" in hardware.waiting_reason(both, [])
    assert hardware.waiting_reason(Requirements(), []) == (
        "waiting for a worker; no worker is live (start one with `loraforge-worker`)"
    )
    # Some live worker can train it: it does not wait for want of one.
    assert hardware.waiting_reason(both, _live(Capabilities(), Capabilities(True, 80, True))) == ""
    assert hardware.waiting_reason(Requirements(), _live(Capabilities())) == ""


@pytest.mark.parametrize("template", tpl.all_templates(), ids=lambda t: t.name)
def test_int_parameters_are_ints_in_defaults_bounds_and_resolved_values(
    template: tpl.Template,
) -> None:
    for p in template.parameters:
        if p.type == "int":
            assert all(type(v) is int for v in (p.default, p.min, p.max)), p.path
    # Overrides arrive as a Struct, whose numbers are all doubles.
    struct = json_format.ParseDict(
        {"peft_config": {"r": 8}, "tokenizer_config": {"model_max_length": 512}},
        struct_pb2.Struct(),
    )
    overrides = json_format.MessageToDict(struct)
    assert overrides["peft_config"]["r"] == 8.0
    params = tpl.resolve_params(template, overrides)
    stored = json.dumps(params.to_dict())
    assert '"r": 8,' in stored and '"model_max_length": 512,' in stored
    assert json.dumps(tpl.normalise_overrides(template, overrides), sort_keys=True) == (
        '{"peft_config": {"r": 8}, "tokenizer_config": {"model_max_length": 512}}'
    )
    # Read back from a Struct (a model version's `params`), ints are ints again.
    echoed = json_format.MessageToDict(json_format.ParseDict(params.to_dict(), struct_pb2.Struct()))
    again = TrainingParams.from_dict(echoed)
    assert again == params and type(again.tokenizer_config.model_max_length) is int


def _write_template(tmp_path: Path, edit: object) -> Path:
    source = tpl.TEMPLATES_DIR / "HF_SmolLM2_135m_instruct_lora.yaml"
    data = yaml.safe_load(source.read_text())
    edit(data["parameters"])  # type: ignore[operator]
    path = tmp_path / source.name
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_template_must_declare_every_training_parameter_with_its_type(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"training parameters \['peft_config.r'\]"):
        tpl.load_template(_write_template(tmp_path, lambda p: p["peft_config"].pop("r")))
    with pytest.raises(ValueError, match=r"peft_config\.r is float, but training takes"):
        tpl.load_template(
            _write_template(tmp_path, lambda p: p["peft_config"]["r"].update(type="float"))
        )
    with pytest.raises(ValueError, match=r"peft_config\.rank is not a training parameter"):
        tpl.load_template(
            _write_template(tmp_path, lambda p: p["peft_config"].update(rank=p["peft_config"]["r"]))
        )


def test_a_run_stored_before_a_parameter_existed_reads_with_its_template_default() -> None:
    t = tpl.get_template("templates/HF_SmolLM2_135m_instruct_lora")
    stored = t.defaults().to_dict()
    del stored["tokenizer_config"]["prompt_format"]
    with pytest.raises(ValueError, match=r"tokenizer_config\.prompt_format: missing"):
        TrainingParams.from_dict(stored)
    assert tpl.stored_params(t.resource_name, stored) == t.defaults()
