"""Predictor protobuf messages to domain types and back, for the servicer and the trainer."""

from __future__ import annotations

from loraforge.predictor.v1 import predictor_service_pb2 as pb
from loraforge.services.common.prompts import CHAT, RAW
from loraforge.services.predictor.params import RequestedParams

PROMPT_FORMATS = {pb.PROMPT_FORMAT_RAW: RAW, pb.PROMPT_FORMAT_CHAT: CHAT}


def params_from_proto(p: pb.InferenceParams) -> RequestedParams:
    """What a client set; unset fields stay None (or empty) for defaults to fill. An unknown
    prompt format is kept, so that the check names it."""
    prompt_format = PROMPT_FORMATS.get(p.prompt_format)
    if prompt_format is None and p.prompt_format != pb.PROMPT_FORMAT_UNSPECIFIED:
        prompt_format = str(p.prompt_format)
    return RequestedParams(
        max_tokens=p.max_tokens if p.HasField("max_tokens") else None,
        temperature=p.temperature if p.HasField("temperature") else None,
        top_p=p.top_p if p.HasField("top_p") else None,
        top_k=p.top_k if p.HasField("top_k") else None,
        repetition_penalty=p.repetition_penalty if p.HasField("repetition_penalty") else None,
        stop=tuple(p.stop),
        seed=p.seed if p.HasField("seed") else None,
        system_prompt=p.system_prompt,
        prompt_template=p.prompt_template,
        prompt_format=prompt_format,
    )


def params_to_proto(r: RequestedParams) -> pb.InferenceParams:
    formats = {v: k for k, v in PROMPT_FORMATS.items()}
    return pb.InferenceParams(
        max_tokens=r.max_tokens,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        repetition_penalty=r.repetition_penalty,
        stop=list(r.stop),
        seed=r.seed,
        system_prompt=r.system_prompt,
        prompt_template=r.prompt_template,
        prompt_format=formats.get(r.prompt_format or "", pb.PROMPT_FORMAT_UNSPECIFIED),
    )
