"""The paper's analysis as a tool: where visual information sits, and where the heads look, layer by layer.

    python -m bench.analyze --model DIR --image PATH [--prompt TEXT] [--max-tokens N] [--kappa K]
        [--out DIR] [--json]

One captioning pass (greedy, unmodified model), then one forward over prompt + caption with eager
attention. For each decoder layer, averaged over the current-token rows (the last prompt token and
every generated token):

- visual info at text side: attention rollout with the residual term (A' = (A + I) / 2, head-averaged,
  rows renormalised) traced from the input; of the image-derived information held by the positions the
  current token can read at that layer's input, the share held by the text-side positions after the
  image (spec section 1: most of it, in the paper's LVLMs);
- attention to text side: the share of the current token's attention (head-averaged) on those positions
  (about a fifth in the paper's LVLMs);
- semantic / global heads: the share of heads SEVI calls semantic, and global (kappa as given), by the
  method's own classification (sevi.method.alignment) over the family's key sets.

Layers where the first two columns part ways are where alignment has room to act: pick start layers
there. Prints a table and writes `analysis.png` (and `analysis.json`) into --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import DynamicCache

from sevi.engines.api import GenerationRequest, SamplingParams, user_message
from sevi.engines.reference.generation import ReferenceModel, run_to_completion
from sevi.families import DEFAULT_PROMPT
from sevi.method.alignment import classify_heads, span_masks
from sevi.method.knob import resolve_alignment


def _caption(model: ReferenceModel, image: Image.Image, prompt: str, max_tokens: int) -> tuple[dict, list[int]]:
    request = GenerationRequest(
        "analyze",
        user_message(prompt),
        [image],
        resolve_alignment(0, model.num_layers),
        SamplingParams(max_tokens=max_tokens),
    )
    done = run_to_completion(model, [request])["analyze"]
    return model.encode(request.messages, request.images), done.token_ids


def attention_maps(model: ReferenceModel, enc: dict[str, torch.Tensor], generated: list[int]) -> list[torch.Tensor]:
    """Per layer, the attention probabilities `[H, T, T]` of the language model over prompt + caption.

    The prompt runs as a prefill, the caption as one cached chunk fed by embeddings (as the engine feeds
    generated tokens), so a generated image-placeholder id stays a plain token. Eager attention.
    """
    fam = model.family
    batch = fam.collate([enc], model.pad_id)
    prompt_len = batch["input_ids"].shape[1]
    positions, offsets = fam.prefill_positions(model.model, batch)
    cache = DynamicCache(config=model.model.config.get_text_config(decoder=True))
    cfg = model.model.config.get_text_config(decoder=True)
    before = cfg._attn_implementation
    cfg._attn_implementation = "eager"
    try:
        with torch.inference_mode():
            first = model.model(
                **batch, position_ids=positions, past_key_values=cache, use_cache=True, output_attentions=True
            )
            maps = [a[0].float() for a in first.attentions]
            if generated:
                ids = torch.tensor([generated], dtype=torch.long)
                steps = [fam.decode_positions(torch.tensor([prompt_len + g]), offsets) for g in range(len(generated))]
                rest = model.model(
                    inputs_embeds=model.model.get_input_embeddings()(ids),
                    attention_mask=torch.ones(1, prompt_len + len(generated), dtype=torch.long),
                    position_ids=torch.cat(steps, -1),
                    past_key_values=cache,
                    use_cache=True,
                    output_attentions=True,
                )
                maps = [
                    torch.cat([torch.nn.functional.pad(m, (0, len(generated))), a[0].float()], 1)
                    for m, a in zip(maps, rest.attentions, strict=True)
                ]
    finally:
        cfg._attn_implementation = before
    return maps


def analyze(
    model: ReferenceModel, image: Image.Image, prompt: str = DEFAULT_PROMPT, max_tokens: int = 32, kappa: float = 0.2
) -> dict[str, Any]:
    enc, generated = _caption(model, image, prompt, max_tokens)
    prompt_ids = enc["input_ids"][0]
    prompt_len = prompt_ids.shape[0]
    layout = model.family.image_layout(prompt_ids)
    if layout.last_image < 0:
        raise ValueError("the prompt holds no image tokens")
    e = layout.last_image
    seq_len = prompt_len + len(generated)
    is_image = torch.zeros(seq_len, dtype=torch.bool)
    is_image[:prompt_len] = layout.image_mask
    rows = torch.arange(prompt_len - 1, seq_len)  # the current-token rows
    n_rows = rows.shape[0]
    keys = torch.arange(seq_len)
    # The key sets as the method builds them: the text side (semantic keys e < j <= i) and the family's "other".
    text_side, other = span_masks(
        keys,
        rows,
        torch.full((n_rows,), e),
        is_image.expand(n_rows, -1),
        torch.full((n_rows,), model.family.other_is_image_only),
    )
    valid = keys[None, :] <= rows[:, None]
    kappas = torch.full((n_rows,), kappa)

    maps = attention_maps(model, enc, generated)
    rollout = torch.eye(seq_len)  # information content of each position, by input token, before layer 0
    layers = []
    for attn in maps:
        held = rollout[:, is_image].sum(-1)  # image-derived information at each position (this layer's input)
        visible = held[None, :] * (torch.arange(seq_len)[None, :] <= rows[:, None])
        vis_share = (visible * text_side).sum(-1) / visible.sum(-1).clamp(min=1e-12)
        mean_attn = attn.mean(0)
        att_share = (mean_attn[rows] * text_side).sum(-1)
        # Heads classified by the method itself. It takes pre-softmax scores; log-probabilities are such scores
        # (their softmax gives the probabilities back), so the heads split as the attention did.
        groups = classify_heads(attn[:, rows].transpose(0, 1).log(), valid, text_side, other, kappas)
        layers.append(
            {
                "visual_info_text_side": float(vis_share.mean()),
                "attention_text_side": float(att_share.mean()),
                "semantic_heads": float(groups.semantic.float().mean()),
                "global_heads": float(groups.global_.float().mean()),
            }
        )
        step = 0.5 * mean_attn + 0.5 * torch.eye(seq_len)
        rollout = (step / step.sum(-1, keepdim=True)) @ rollout
    caption = model.tokenizer.decode(generated, skip_special_tokens=True)
    return {"caption": caption, "prompt_tokens": prompt_len, "last_image": e, "kappa": kappa, "layers": layers}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = result["layers"]
    xs = list(range(len(layers)))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, [r["visual_info_text_side"] for r in layers], marker="o", label="visual info at text side (rollout)")
    ax.plot(xs, [r["attention_text_side"] for r in layers], marker="s", label="attention to text side")
    ax.plot(xs, [r["global_heads"] for r in layers], linestyle="--", label=f"global heads (kappa {result['kappa']})")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("share")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.set_title("Where visual information sits vs. where the current token looks")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--kappa", type=float, default=0.2)
    parser.add_argument("--out", default="runs/analysis")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    args = parser.parse_args(argv)
    model = ReferenceModel.load(args.model)
    result = analyze(model, Image.open(args.image).convert("RGB"), args.prompt, args.max_tokens, args.kappa)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "analysis.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "analysis.png")
    if args.json:
        print(json.dumps(result))
        return
    print(f"caption: {result['caption']!r}")
    print(
        f"{'layer':>5} {'visual info text side':>22} {'attention text side':>20} {'semantic heads':>15} "
        f"{'global heads':>13}"
    )
    for i, r in enumerate(result["layers"]):
        print(
            f"{i:>5} {r['visual_info_text_side']:>22.3f} {r['attention_text_side']:>20.3f} "
            f"{r['semantic_heads']:>15.3f} {r['global_heads']:>13.3f}"
        )
    print(f"plot: {out / 'analysis.png'}")


if __name__ == "__main__":
    main()
