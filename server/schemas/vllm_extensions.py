"""vLLM's documented extensions of the chat API (`vllm serve`'s `ChatCompletionRequest`), so that what vLLM's
clients send (its benchmark client always sends `ignore_eos` for random data) is honoured or refused by name.

The sampling extensions in :data:`SAMPLING_EXTENSIONS` are honoured by an engine that lists them in
`Engine.sampling_extensions` (both engines honour all of them) and refused with a 400 naming the field by one that
does not. The other vLLM fields are declared too, typed loosely, and accepted only at vLLM's default (or, for the
hints that never change the output, with any value); `server.chat_support` refuses any other value by name. A
field neither OpenAI nor vLLM has is still refused by the schema (`extra="forbid"`): a misspelt field is a 400.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

# Fields of vLLM's sampling parameters that an engine may honour (the engine API's `SamplingParams` has them).
from sevi.engines.api import SAMPLING_EXTENSIONS as SAMPLING_EXTENSIONS

_VLLM = "vLLM extension; "
_REFUSED = _VLLM + "accepted only at vLLM's default, refused with a 400 that names the field otherwise."
_NO_EFFECT = _VLLM + "accepted; has no effect on the output."


class VllmChatExtensions(BaseModel):
    """vLLM's extra chat-completion fields, with vLLM's names, meanings and defaults."""

    # Sampling, honoured (SAMPLING_EXTENSIONS).
    ignore_eos: bool = Field(False, description=_VLLM + "generate to the token budget past EOS.")
    min_tokens: int = Field(0, ge=0, description=_VLLM + "no EOS, stop token or stop string before this many tokens.")
    top_k: int | None = Field(None, ge=-1, description=_VLLM + "sample among the k likeliest tokens (0 / -1: all).")
    min_p: float | None = Field(None, ge=0, le=1, description=_VLLM + "drop tokens below min_p x the top probability.")
    repetition_penalty: float | None = Field(
        None, gt=0, le=10, description=_VLLM + "prompt and generated tokens penalised (> 1) or favoured (< 1)."
    )
    stop_token_ids: list[int] | None = Field(None, description=_VLLM + "token ids that end the generation.")
    skip_special_tokens: bool = Field(True, description=_VLLM + "leave special tokens out of the text.")
    include_stop_str_in_output: bool = Field(False, description=_VLLM + "keep the matched stop string in the text.")
    # Sampling, refused unless at vLLM's default.
    use_beam_search: bool = Field(False, description=_REFUSED)
    length_penalty: float = Field(1.0, description=_REFUSED)
    watermarking: bool | None = Field(None, description=_REFUSED)
    spaces_between_special_tokens: bool = Field(True, description=_REFUSED)
    truncate_prompt_tokens: int | None = Field(None, description=_REFUSED)
    truncation_side: str | None = Field(None, description=_REFUSED)
    prompt_logprobs: int | None = Field(None, description=_REFUSED)
    logprob_token_ids: list[int] | None = Field(None, description=_REFUSED)
    allowed_token_ids: list[int] | None = Field(None, description=_REFUSED)
    bad_words: list[str] | None = Field(None, description=_REFUSED)
    thinking_token_budget: Any = Field(None, description=_REFUSED)
    structured_outputs: Any = Field(None, description=_REFUSED)
    repetition_detection: Any = Field(None, description=_REFUSED)
    vllm_xargs: dict[str, Any] | None = Field(None, description=_REFUSED + " SEVI's knobs are top-level fields here.")
    # Prompt rendering, refused unless at vLLM's default.
    echo: bool = Field(False, description=_REFUSED)
    add_generation_prompt: bool = Field(True, description=_REFUSED)
    continue_final_message: bool = Field(False, description=_REFUSED)
    add_special_tokens: bool = Field(False, description=_REFUSED)
    documents: list[dict[str, str]] | None = Field(None, description=_REFUSED)
    chat_template: str | None = Field(None, description=_REFUSED)
    chat_template_kwargs: dict[str, Any] | None = Field(None, description=_REFUSED)
    media_io_kwargs: dict[str, Any] | None = Field(None, description=_REFUSED)
    mm_processor_kwargs: dict[str, Any] | None = Field(None, description=_REFUSED)
    priority: int = Field(0, description=_REFUSED + " (one FCFS queue)")
    # Response shape, refused unless at vLLM's default.
    return_tokens_as_token_ids: bool | None = Field(None, description=_REFUSED)
    return_token_ids: bool | None = Field(None, description=_REFUSED)
    return_prompt_text: bool | None = Field(None, description=_REFUSED)
    stream_interval: int | None = Field(None, description=_REFUSED)
    return_token_offsets: bool | None = Field(False, description=_REFUSED)
    routed_experts_prompt_start: int = Field(0, description=_REFUSED)
    mm_payload: str = Field("tensors", description=_REFUSED)
    kv_transfer_params: dict[str, Any] | None = Field(None, description=_REFUSED)
    ec_transfer_params: dict[str, Any] | None = Field(None, description=_REFUSED)
    # Hints that never change the output.
    include_reasoning: bool = Field(True, description=_NO_EFFECT)
    request_id: str | None = Field(None, description=_NO_EFFECT + " (the response id is the server's own)")
    session_id: str | None = Field(None, description=_NO_EFFECT)
    cache_salt: str | None = Field(None, description=_NO_EFFECT + " (cached blocks are the unmodified model's)")


# Refused vLLM fields and the one value each is accepted with (vLLM's default).
REFUSED_DEFAULTS: dict[str, Any] = {
    name: info.default
    for name, info in VllmChatExtensions.model_fields.items()
    if name not in SAMPLING_EXTENSIONS and info.description is not None and info.description.startswith(_REFUSED)
}
