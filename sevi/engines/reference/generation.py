"""The reference generator: batched, KV-cached decoding with per-request SEVI and contrastive decoding.

Data flow for one batch: requests -> chat template + processor (one encoding per row; a request with
contrast on adds a second row on a contrast image) -> left-padded batch -> prefill under the "sevi"
attention with an :class:`AlignmentBatch` -> per step: main/contrast logits -> CICD -> sampling ->
tokens appended to both rows -> :class:`TokenEvent` per request. Finished rows leave the batch.

Pure PyTorch/transformers; the server wraps it in an async engine and the CLI calls it directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, DynamicCache

from sevi.engines.api import GenerationRequest, RequestError, TokenEvent, is_stop_token, stop_ids, text_stream
from sevi.engines.contrast_pool import ContrastPool
from sevi.engines.detokenizer import TextStream
from sevi.engines.reference.sevi_attention import AlignmentBatch, alignment_context, use_sevi_attention
from sevi.families import Family, eos_token_ids, family_for, image_parts, render_prompt
from sevi.method.contrastive import contrast_logits
from sevi.method.sampling import apply_penalties, block_tokens, sample_token
from sevi.method.telemetry import Telemetry


@dataclass
class _Row:
    request: GenerationRequest
    contrast: bool  # the unmodified row on the contrast image, paired with its request's main row


@dataclass
class _RequestState:
    request: GenerationRequest
    prompt_ids: list[int]
    generator: torch.Generator | None
    output: TextStream
    finish_reason: str | None = None
    contrast_steps: int = 0  # tokens chosen from contrasted logits

    @property
    def token_ids(self) -> list[int]:
        return self.output.token_ids

    @property
    def text(self) -> str:
        return self.output.text


class ReferenceModel:
    """A loaded model folder (weights, processor, chat template) ready for batched generation."""

    def __init__(
        self, model: Any, processor: Any, contrast_pool: ContrastPool | None = None, name: str = "model"
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.family: Family = family_for(model.config)
        self.contrast_pool = contrast_pool or ContrastPool.default()
        self.name = name
        use_sevi_attention(self.model)
        text_cfg = model.config.get_text_config(decoder=True)
        self.max_positions = int(getattr(text_cfg, "max_position_embeddings", 4096))
        self.pad_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0)
        self.eos_ids = set(eos_token_ids(model.config, getattr(model, "generation_config", None), self.tokenizer))

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        contrast_pool: ContrastPool | None = None,
    ) -> ReferenceModel:
        path = Path(path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is not a Hugging Face model folder (no config.json)")
        processor = AutoProcessor.from_pretrained(path)
        model: Any = AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype)
        model = model.to(device)
        return cls(model, processor, contrast_pool, name=path.name)

    @property
    def num_layers(self) -> int:
        return self.family.num_layers

    def prompt_text(self, messages: list[dict[str, Any]]) -> str:
        return render_prompt(self.processor, messages)

    def encode(self, messages: list[dict[str, Any]], images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """Chat template + processor for one prompt; image placeholders come back expanded."""
        n_parts = image_parts(messages)
        if n_parts != len(images):
            raise RequestError(f"{n_parts} image parts but {len(images)} images", "messages")
        text = self.prompt_text(messages)
        kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt"}
        if images:
            kwargs["images"] = [im.convert("RGB") for im in images]
        enc = self.processor(**kwargs)
        return {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}

    def start(self, requests: Sequence[GenerationRequest]) -> DecodeBatch:
        return DecodeBatch(self, list(requests))


class DecodeBatch:
    """One running batch. `step()` advances every live request by one token."""

    def __init__(self, owner: ReferenceModel, requests: list[GenerationRequest]) -> None:
        if not requests:
            raise ValueError("empty batch")
        self.owner = owner
        fam = owner.family
        rows: list[_Row] = []
        encodings: list[dict[str, torch.Tensor]] = []
        self.states: dict[str, _RequestState] = {}
        for req in requests:
            if req.request_id in self.states:
                raise ValueError(f"duplicate request id {req.request_id}")
            enc = owner.encode(req.messages, req.images)
            prompt_ids = enc["input_ids"][0].tolist()
            if len(prompt_ids) + req.sampling.max_tokens > owner.max_positions:
                raise RequestError(
                    f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({req.sampling.max_tokens}) exceeds the "
                    f"model's context of {owner.max_positions} tokens",
                    "max_tokens",
                )
            gen = None
            if req.sampling.temperature > 0:
                gen = torch.Generator().manual_seed(
                    req.sampling.seed if req.sampling.seed is not None else int(torch.randint(0, 2**62, ()).item())
                )
            self.states[req.request_id] = _RequestState(
                req, prompt_ids, gen, text_stream(owner.tokenizer, req.sampling)
            )
            rows.append(_Row(req, False))
            encodings.append(enc)
            if req.alignment.contrast and req.images:
                contrast = req.contrast_images or owner.contrast_pool.draw(
                    req.sampling.seed, req.images[0], k=len(req.images)
                )
                c_enc = owner.encode(req.messages, contrast)
                rows.append(_Row(req, True))
                encodings.append(c_enc)
        self.rows = rows
        batch = fam.collate(encodings, owner.pad_id)
        width = batch["input_ids"].shape[1]
        self.attention_mask = batch["attention_mask"]
        self.lengths = self.attention_mask.sum(-1)  # unpadded length of each row
        positions, self.offsets = fam.prefill_positions(owner.model, batch)
        self.alignment = self._alignment_batch(batch["input_ids"], width)
        self.cache = DynamicCache(config=owner.model.config.get_text_config(decoder=True))
        self.last_logits: torch.Tensor | None = None  # raw main-row logits of the last step (for tests)
        with torch.inference_mode(), alignment_context(self.alignment):
            out = owner.model(
                **batch, position_ids=positions, past_key_values=self.cache, use_cache=True, logits_to_keep=1
            )
        self._logits = out.logits[:, -1].float()

    def _alignment_batch(self, input_ids: torch.Tensor, width: int) -> AlignmentBatch:
        fam = self.owner.family
        omega, kappa, start, last, image_keys = [], [], [], [], []
        for row, ids in zip(self.rows, input_ids, strict=True):
            layout = fam.image_layout(ids)
            params = row.request.alignment
            on = params.active and not row.contrast  # the contrast branch is the unmodified model
            omega.append(params.omega if on else 0.0)
            kappa.append(params.kappa)
            start.append(params.start_layer)
            last.append(layout.last_image)
            image_keys.append(layout.image_mask)
        n = len(self.rows)
        return AlignmentBatch(
            omega=torch.tensor(omega, dtype=torch.float32),
            kappa=torch.tensor(kappa, dtype=torch.float32),
            start_layer=torch.tensor(start, dtype=torch.long),
            last_image=torch.tensor(last, dtype=torch.long),
            align_from=torch.full((n,), width - 1, dtype=torch.long),  # the last prompt row, then every new row
            image_keys=torch.stack(image_keys),
            other_is_image_only=torch.full((n,), fam.other_is_image_only, dtype=torch.bool),
        )

    @property
    def done(self) -> bool:
        return not self.rows

    def cancel(self, request_id: str) -> None:
        """Drop a request (client gone); its rows leave the batch before the next forward."""
        state = self.states.get(request_id)
        if state is not None and state.finish_reason is None:
            state.finish_reason = "cancelled"
            self._drop_finished()

    def step(self) -> list[TokenEvent]:
        if self.done:
            return []
        logits = self._logits
        main_idx = [i for i, r in enumerate(self.rows) if not r.contrast]
        partner = {r.request.request_id: i for i, r in enumerate(self.rows) if r.contrast}
        main = logits[main_idx]
        self.last_logits = main
        mixed = main.clone()
        with_contrast = [k for k, i in enumerate(main_idx) if self.rows[i].request.request_id in partner]
        if with_contrast:
            c_rows = [partner[self.rows[main_idx[k]].request.request_id] for k in with_contrast]
            mixed[with_contrast] = contrast_logits(main[with_contrast], logits[c_rows])
            for k in with_contrast:
                self.states[self.rows[main_idx[k]].request.request_id].contrast_steps += 1
        tokens = self._sample(mixed, [self.rows[i].request.request_id for i in main_idx])

        events: list[TokenEvent] = []
        next_ids = torch.full((len(self.rows),), self.owner.pad_id, dtype=torch.long)
        for k, i in enumerate(main_idx):
            rid = self.rows[i].request.request_id
            token = int(tokens[k])
            next_ids[i] = token
            if rid in partner:
                next_ids[partner[rid]] = token  # the contrast row follows the main row's choice
            events.append(self._advance(self.states[rid], token))
        keep = self._drop_finished()
        if self.rows:
            self._forward(next_ids[keep])
        return events

    def _sample(self, logits: torch.Tensor, request_ids: list[str]) -> torch.Tensor:
        """The next token of each request from its (contrasted) logits `[R, V]`, penalised in place."""
        for k, rid in enumerate(request_ids):
            s = self.states[rid]
            sp = s.request.sampling
            if len(s.token_ids) < sp.min_tokens:
                block_tokens(logits[k], stop_ids(sp, self.owner.eos_ids))
            apply_penalties(
                logits[k],
                s.token_ids,
                sp.presence_penalty,
                sp.frequency_penalty,
                sp.repetition_penalty,
                s.prompt_ids,
            )
        tokens = logits.argmax(-1)
        for k, rid in enumerate(request_ids):
            s = self.states[rid]
            if s.generator is not None:
                sp = s.request.sampling
                tokens[k] = sample_token(logits[k], sp.temperature, sp.top_p, s.generator, sp.top_k, sp.min_p)
        return tokens

    def _advance(self, s: _RequestState, token: int) -> TokenEvent:
        finish: str | None
        if is_stop_token(token, s.request.sampling, self.owner.eos_ids, len(s.token_ids)):
            new_text, finish = s.output.flush(), "stop"
        else:
            new_text, finish = s.output.append(token)
        s.finish_reason = finish
        telemetry = self._telemetry(s.request.request_id) if finish else None
        return TokenEvent(s.request.request_id, token, new_text, finish, len(s.prompt_ids), len(s.token_ids), telemetry)

    def _telemetry(self, request_id: str) -> Telemetry:
        i = next(i for i, r in enumerate(self.rows) if r.request.request_id == request_id and not r.contrast)
        return Telemetry.from_counts(
            self.alignment.telemetry.row(i), contrast_steps=self.states[request_id].contrast_steps
        )

    def _drop_finished(self) -> torch.Tensor:
        """Remove the rows of finished requests from every per-row tensor; returns the kept row indices."""
        keep = [i for i, r in enumerate(self.rows) if self.states[r.request.request_id].finish_reason is None]
        idx = torch.tensor(keep, dtype=torch.long)
        if len(keep) == len(self.rows):
            return idx
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            return idx
        self.cache.batch_select_indices(idx)
        self.attention_mask = self.attention_mask[idx]
        self.lengths = self.lengths[idx]
        self.offsets = self.offsets[idx]
        self.alignment = self.alignment.select(idx)
        self._logits = self._logits[idx]
        return idx

    def _forward(self, next_ids: torch.Tensor) -> None:
        owner = self.owner
        positions = owner.family.decode_positions(self.lengths, self.offsets)
        self.attention_mask = torch.cat([self.attention_mask, torch.ones_like(self.attention_mask[:, :1])], 1)
        self.lengths = self.lengths + 1
        self.alignment.extend_keys(1)
        # Embeddings, not ids: a generated image-placeholder id must stay a plain token, not an image slot.
        embeds = owner.model.get_input_embeddings()(next_ids[:, None])
        with torch.inference_mode(), alignment_context(self.alignment):
            out = owner.model(
                inputs_embeds=embeds,
                attention_mask=self.attention_mask,
                position_ids=positions,
                past_key_values=self.cache,
                use_cache=True,
            )
        self._logits = out.logits[:, -1].float()


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str
    telemetry: Telemetry


def run_to_completion(model: ReferenceModel, requests: Sequence[GenerationRequest]) -> dict[str, Completion]:
    """Generate every request to the end; results by request id."""
    batch = model.start(requests)
    out: dict[str, Completion] = {}
    while not batch.done:
        for ev in batch.step():
            if ev.finish_reason is not None:
                s = batch.states[ev.request_id]
                out[ev.request_id] = Completion(
                    s.text, list(s.token_ids), list(s.prompt_ids), ev.finish_reason, ev.telemetry or Telemetry()
                )
    return out
