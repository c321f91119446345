"""The reference engine on tiny random models of every family: exactness, alignment, batching, caching."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from sevi.engines.api import GenerationRequest, SamplingParams, user_message
from sevi.engines.reference.generation import ReferenceModel, run_to_completion
from sevi.engines.reference.sevi_attention import AlignmentBatch, alignment_context
from sevi.method.knob import AlignmentParams, resolve_alignment
from tests.sevi_reference import loop_attention_row
from tests.support.images import random_image

pytestmark = pytest.mark.integration

FAMILIES = ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"]
PROMPT = "please describe this image"
# Strong enough, and a kappa high enough, that core, global and other heads all occur in these models.
STRONG = {"omega": 2.0, "start_layer": 1, "kappa": 0.6, "contrast": False}


def _req(
    rid: str,
    params: AlignmentParams,
    image_seed: int | None = 0,
    n: int = 10,
    size: tuple[int, int] = (48, 40),
    **sampling: Any,
) -> GenerationRequest:
    if image_seed is None:
        return GenerationRequest(
            rid, [{"role": "user", "content": PROMPT}], [], params, SamplingParams(max_tokens=n, **sampling)
        )
    return GenerationRequest(
        rid, user_message(PROMPT), [random_image(image_seed, size)], params, SamplingParams(max_tokens=n, **sampling)
    )


def _steps(model: ReferenceModel, requests: list[GenerationRequest]) -> tuple[dict[str, list[int]], list[Any]]:
    """Tokens per request, and the raw main-row logits of each step (first request's row)."""
    batch = model.start(requests)
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    logits = []
    while not batch.done:
        events = batch.step()
        assert batch.last_logits is not None
        logits.append(batch.last_logits[0].clone())
        for ev in events:
            if ev.token_id is not None:
                tokens[ev.request_id].append(ev.token_id)
    return tokens, logits


@pytest.mark.parametrize("family", FAMILIES)
def test_off_and_text_only_equal_the_unmodified_model(
    family: str, tiny_model: Callable[[str], ReferenceModel], tiny_model_dir: Callable[[str], Any]
) -> None:
    model = tiny_model(family)
    stock = (
        type(model.model)
        .from_pretrained(tiny_model_dir(family), dtype=torch.float32, attn_implementation="sdpa")
        .eval()
    )
    off = resolve_alignment(0, model.num_layers)
    focused_text = resolve_alignment(1, model.num_layers, kappa=0.6)
    requests = [_req("img-off", off, 1, 12), _req("text-focused", focused_text, None, 12)]
    got = run_to_completion(model, requests)
    for r in requests:
        enc = model.encode(r.messages, r.images)
        want = stock.generate(**enc, do_sample=False, max_new_tokens=12, pad_token_id=model.pad_id)[
            0, enc["input_ids"].shape[1] :
        ].tolist()
        while want and want[-1] in model.eos_ids:  # the engine reports EOS as the finish, not as a token
            want.pop()
        assert got[r.request_id].token_ids == want, r.request_id


def _loop_reference_attention(state: dict[str, Any]) -> Callable[..., tuple[torch.Tensor, None]]:
    """Eager attention for one unpadded sequence; rows from `align_from` on go through the loop reference."""

    def forward(
        module: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Any,
        dropout: float = 0.0,
        scaling: float | None = None,
        **_: Any,
    ) -> tuple[torch.Tensor, None]:
        _, n_heads, q_len, dim = query.shape
        rep = n_heads // key.shape[1]
        k = key[0].repeat_interleave(rep, 0)
        v = value[0].repeat_interleave(rep, 0)
        scale = scaling if scaling is not None else dim**-0.5
        out = torch.zeros(q_len, n_heads, dim, dtype=torch.float64)
        for i in range(q_len):
            keys = list(range(i + 1))
            aligned = i >= state["align_from"] and module.layer_idx >= state["start_layer"]
            semantic = set(range(state["e"] + 1, i + 1))
            other = set(state["image"]) if state["qwen"] else set(range(state["e"] + 1))
            out[i] = loop_attention_row(
                query[0, :, i].double(),
                k.double(),
                v.double(),
                scale,
                keys,
                semantic,
                other,
                state["omega"],
                state["kappa"],
                aligned,
            )
        return out[None].to(query.dtype), None

    return forward


@contextmanager
def _attention(model: ReferenceModel, name: str) -> Iterator[None]:
    cfg = model.model.config.get_text_config(decoder=True)
    before = cfg._attn_implementation
    cfg._attn_implementation = name
    try:
        yield
    finally:
        cfg._attn_implementation = before


def _full_inputs(model: ReferenceModel, request: GenerationRequest, generated: list[int]) -> dict[str, Any]:
    enc = model.encode(request.messages, request.images)
    extra = torch.tensor([generated], dtype=torch.long)
    enc["input_ids"] = torch.cat([enc["input_ids"], extra], 1)
    enc["attention_mask"] = torch.ones_like(enc["input_ids"])
    if "mm_token_type_ids" in enc:
        enc["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], torch.zeros_like(extra).int()], 1)
    return enc


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_kv_cached_aligned_decoding_equals_loop_reference_and_full_recompute(
    family: str, tiny_model: Callable[[str], ReferenceModel]
) -> None:
    model = tiny_model(family)
    params = resolve_alignment(1.0, model.num_layers, **STRONG)
    request = _req("a", params, 1, 8)
    tokens, cached_logits = _steps(model, [request])
    generated = tokens["a"]
    assert model.family.image_token_id not in generated  # full recompute by ids needs plain tokens here
    prompt = model.encode(request.messages, request.images)["input_ids"][0]
    layout = model.family.image_layout(prompt)
    p_len = prompt.shape[0]
    full = _full_inputs(model, request, generated[:-1])

    # 1. The naive loop implementation of spec section 2, without cache: every row from the last prompt row on.
    state = {
        "align_from": p_len - 1,
        "start_layer": params.start_layer,
        "e": layout.last_image,
        "image": layout.image_mask.nonzero()[:, 0].tolist(),
        "qwen": model.family.other_is_image_only,
        "omega": params.omega,
        "kappa": params.kappa,
    }
    AttentionInterface.register("sevi_loop_ref", _loop_reference_attention(state))
    AttentionMaskInterface.register("sevi_loop_ref", sdpa_mask)
    with torch.inference_mode(), _attention(model, "sevi_loop_ref"):
        loop_logits = model.model(**full).logits[0, p_len - 1 :]
    # 2. The project's own hook, full recompute without cache.
    n = full["input_ids"].shape[1]
    batch = AlignmentBatch(
        omega=torch.tensor([params.omega]),
        kappa=torch.tensor([params.kappa]),
        start_layer=torch.tensor([params.start_layer]),
        last_image=torch.tensor([layout.last_image]),
        align_from=torch.tensor([p_len - 1]),
        image_keys=torch.cat([layout.image_mask, torch.zeros(n - p_len, dtype=torch.bool)])[None],
        other_is_image_only=torch.tensor([model.family.other_is_image_only]),
    )
    with torch.inference_mode(), alignment_context(batch):
        recompute_logits = model.model(**full).logits[0, p_len - 1 :]

    cached = torch.stack(cached_logits)
    assert cached.shape == loop_logits.shape
    # float32 engine against a float64 loop: agreement to a few 1e-4 on logits of magnitude ~10.
    torch.testing.assert_close(cached, loop_logits.float(), rtol=1e-4, atol=5e-4)
    torch.testing.assert_close(cached, recompute_logits.float(), rtol=1e-4, atol=5e-4)
    assert cached.argmax(-1).tolist() == generated

    # The check is not vacuous: both stages fired, and the alignment moved the logits.
    plain_tokens, _ = _steps(model, [_req("a", resolve_alignment(0, model.num_layers), 1, 8)])
    tele = run_to_completion(model, [request])["a"].telemetry
    assert tele.stage1_rows > 0 and tele.stage2_rows > 0, tele
    assert plain_tokens["a"] != generated


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_equals_each_request_alone(family: str, tiny_model: Callable[[str], ReferenceModel]) -> None:
    model = tiny_model(family)
    L = model.num_layers
    requests = [
        _req("off", resolve_alignment(0, L), 1, 8, size=(64, 40)),
        _req("balanced", resolve_alignment(0.5, L, kappa=0.6, contrast=False), 2, 8),
        _req("focused-cicd", resolve_alignment(1.0, L, kappa=0.6), 3, 8, size=(40, 72)),
        _req("explicit", resolve_alignment(None, L, **STRONG), 4, 6),
        _req("text-only", resolve_alignment(1.0, L), None, 5),
        _req("sampled", resolve_alignment(0.75, L, kappa=0.6), 5, 8, temperature=0.9, top_p=0.9, seed=7),
    ]
    together = run_to_completion(model, requests)
    for r in requests:
        alone = run_to_completion(model, [r])[r.request_id]
        assert together[r.request_id].token_ids == alone.token_ids, r.request_id
        assert together[r.request_id].telemetry == alone.telemetry, r.request_id
    # The knobs matter in this batch: aligned requests changed tokens against the same image with alignment off.
    changed = 0
    for r in requests[1:4]:
        off = GenerationRequest(r.request_id, r.messages, r.images, resolve_alignment(0, L), r.sampling)
        changed += run_to_completion(model, [off])[r.request_id].token_ids != together[r.request_id].token_ids
    assert changed >= 1


def test_contrast_branch_combines_main_and_contrast_logits(tiny_model: Callable[[str], ReferenceModel]) -> None:
    from sevi.method.contrastive import contrast_logits

    model = tiny_model("llava")
    L = model.num_layers
    contrast_image = random_image(99, (32, 32))
    with_cicd = _req("x", resolve_alignment(1.0, L, kappa=0.6, contrast=True), 6, 1)
    with_cicd.contrast_images = [contrast_image]
    main_only = _req("x", resolve_alignment(1.0, L, kappa=0.6, contrast=False), 6, 1)
    contrast_only = _req("x", resolve_alignment(0, L), 6, 1)
    contrast_only.images = [contrast_image]
    _, a = _steps(model, [main_only])
    _, b = _steps(model, [contrast_only])
    got = run_to_completion(model, [with_cicd])["x"].token_ids[0]
    assert got == int(contrast_logits(a[0][None], b[0][None]).argmax())


def test_contrast_draw_is_reproducible(tiny_model: Callable[[str], ReferenceModel]) -> None:
    pool = tiny_model("llava").contrast_pool
    img = random_image(1)
    assert [id(x) for x in pool.draw(5, img, 3)] == [id(x) for x in pool.draw(5, img, 3)]
    assert [id(x) for x in pool.draw(None, img, 2)] == [id(x) for x in pool.draw(None, img, 2)]
    draws = {tuple(id(x) for x in pool.draw(s, img, 2)) for s in range(20)}
    assert len(draws) > 1


def test_sampling_is_reproducible_under_a_seed(tiny_model: Callable[[str], ReferenceModel]) -> None:
    model = tiny_model("qwen2_vl")
    p = resolve_alignment(0.5, model.num_layers)
    runs = [
        run_to_completion(model, [_req("s", p, 2, 12, temperature=1.0, seed=s)])["s"].token_ids
        for s in (11, 11, 12, 13)
    ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2] or runs[0] != runs[3]


def test_generated_image_placeholder_is_a_plain_token(tiny_model_dir: Callable[[str], Any]) -> None:
    """A model that emits its own image id must not crash the engine or be fed image features."""
    model = ReferenceModel.load(tiny_model_dir("llava"))
    image_id = model.family.image_token_id
    with torch.no_grad():
        head = model.model.lm_head.weight
        head[image_id] = head.mean(0) * 0 + 50 * torch.nn.functional.normalize(head.sum(0), dim=0)
    request = _req("g", resolve_alignment(1.0, model.num_layers, kappa=0.6), 1, 6)
    out = run_to_completion(model, [request])["g"]
    assert image_id in out.token_ids
    assert len(out.token_ids) == 6


def test_stop_strings_and_eos(tiny_model: Callable[[str], ReferenceModel]) -> None:
    model = tiny_model("llava")
    p = resolve_alignment(0, model.num_layers)
    full = run_to_completion(model, [_req("f", p, 1, 12)])["f"]
    words = full.text.split()
    assert len(words) >= 3
    stop = words[2]
    cut = run_to_completion(model, [_req("c", p, 1, 12, stop=(stop,))])["c"]
    assert cut.finish_reason == "stop"
    assert stop not in cut.text and full.text.startswith(cut.text.rstrip())


def test_cancel_removes_a_request_mid_batch(tiny_model: Callable[[str], ReferenceModel]) -> None:
    model = tiny_model("qwen2_vl")
    p = resolve_alignment(0.5, model.num_layers, kappa=0.6)
    keep, drop = _req("keep", p, 1, 10), _req("drop", p, 2, 10)
    batch = model.start([keep, drop])
    batch.step()
    batch.cancel("drop")
    seen = set()
    while not batch.done:
        seen.update(ev.request_id for ev in batch.step())
    assert seen == {"keep"}
    assert batch.states["keep"].token_ids == run_to_completion(model, [keep])["keep"].token_ids


def test_ignore_eos_runs_to_max_tokens(
    tiny_model: Callable[[str], ReferenceModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Benchmarks set ignore_eos so that every request does the same work: with it an EOS token is generated
    like any other (same ids as before); without it the request stops there."""
    model = tiny_model("llava")
    p = resolve_alignment(0, model.num_layers)
    full = run_to_completion(model, [_req("f", p, 1, 8)])["f"]
    assert len(full.token_ids) == 8
    monkeypatch.setattr(model, "eos_ids", {full.token_ids[2]})  # make the third token an EOS
    stopped = run_to_completion(model, [_req("s", p, 1, 8)])["s"]
    assert stopped.finish_reason == "stop" and len(stopped.token_ids) <= 3
    kept = run_to_completion(model, [_req("k", p, 1, 8, ignore_eos=True)])["k"]
    assert kept.token_ids == full.token_ids and kept.finish_reason == "length"
