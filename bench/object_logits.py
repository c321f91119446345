"""Does the alignment act on hallucinated object words more than on true ones? (issue 16)

    python -m bench.object_logits --model models/bundled --limit 40
    python -m bench.object_logits --model runs/pilot-x/latest --settings 4:1:0.5,20:0:0.9

CHAIR counts captions; this looks at the words. For each scene of a synthetic split, the unmodified model
(c = 0) writes its greedy caption; then that caption is replayed, token for token, through the same model
under each SEVI setting (teacher forcing: every setting sees the same prefix, so the figures compare like
with like). At each position where the c = 0 caption names a COCO object (read as the CHAIR scorer reads
it), the setting's log-probability of that word is compared with c = 0's: over the mentions of objects
absent from the scene (hallucinations) and over those present. A knob that makes captions more cautious
the way the method means to lowers the first much more than the second; a setting that lowers both alike
only perturbs the model (and then CHAIR falls only with recall).

Settings: the served model's knob map at c = 0.25 / 0.5 / 0.75 / 1 (its `sevi_presets.json`, else the
paper's map), plus any `--settings omega:start_layer:kappa`. Contrastive decoding is off throughout: this
measures the attention change alone. Reference engine, float32, one thread by default.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.chair.score import caption_objects
from sevi.engines.api import GenerationRequest, SamplingParams, user_message
from sevi.engines.reference.generation import ReferenceModel, run_to_completion
from sevi.families import DEFAULT_PROMPT
from sevi.method.knob import AlignmentParams, load_knob_map, resolve_alignment
from training import scenes


@dataclass
class Mention:
    position: int  # index in the generated tokens of the word's decision (first word of a two-word name)
    category: str
    present: bool


@dataclass
class SettingShift:
    """One setting's effect on the object words of the c = 0 captions."""

    name: str
    params: AlignmentParams
    absent: list[float] = field(default_factory=list)  # log p(setting) - log p(c = 0), per absent-object mention
    present: list[float] = field(default_factory=list)
    absent_moved: int = 0  # mentions whose word is no longer the setting's argmax
    present_moved: int = 0

    def summary(self) -> dict[str, Any]:
        def mean(xs: list[float]) -> float | None:
            return round(sum(xs) / len(xs), 4) if xs else None

        return {
            "omega": self.params.omega,
            "start_layer": self.params.start_layer,
            "kappa": self.params.kappa,
            "dlogp_absent": mean(self.absent),
            "dlogp_present": mean(self.present),
            "moved_absent": round(self.absent_moved / len(self.absent), 4) if self.absent else None,
            "moved_present": round(self.present_moved / len(self.present), 4) if self.present else None,
        }


def mentions(model: ReferenceModel, token_ids: Sequence[int], truth: set[str]) -> list[Mention]:
    """Object mentions of a generated caption, each at the token where its word begins."""
    found: list[Mention] = []
    seen = 0
    for t in range(1, len(token_ids) + 1):
        objects = caption_objects(model.tokenizer.decode(list(token_ids[:t]), skip_special_tokens=True))
        if len(objects) > seen:  # the mention completed at token t - 1
            word, category = objects[-1]
            start = t - 1 - (1 if " " in word and t >= 2 else 0)  # two-word names are decided at their first
            found.append(Mention(start, category, category in truth))
        seen = len(objects)
    return found


def forced_logprobs(
    model: ReferenceModel, image: Any, prompt: str, forced: Sequence[int], settings: Sequence[AlignmentParams]
) -> torch.Tensor:
    """[settings, tokens, vocab] log-probabilities of the next token, every setting fed `forced` as its output."""
    messages = user_message(prompt)
    requests = [
        GenerationRequest(f"s{k}", messages, [image], params, SamplingParams(max_tokens=len(forced)))
        for k, params in enumerate(settings)
    ]
    batch = model.start(requests)
    steps: list[torch.Tensor] = []

    def replay(logits: torch.Tensor, request_ids: list[str]) -> torch.Tensor:
        return torch.full((len(request_ids),), forced[len(steps) - 1], dtype=torch.long)

    batch._sample = replay  # type: ignore[method-assign]  # teacher forcing: the step's token is given
    while not batch.done and len(steps) < len(forced):
        logits = batch._logits[[i for i, r in enumerate(batch.rows) if not r.contrast]]
        steps.append(torch.log_softmax(logits.float(), dim=-1))
        batch.step()
    return torch.stack(steps, dim=1)


def measure(
    model: ReferenceModel,
    settings: dict[str, AlignmentParams],
    split: str = "counter-prior",
    limit: int = 40,
    max_tokens: int = 48,
    prompt: str = DEFAULT_PROMPT,
) -> tuple[list[SettingShift], dict[str, int]]:
    off = resolve_alignment(0, model.num_layers)
    shifts = [SettingShift(name, params) for name, params in settings.items()]
    counts = {"scenes": 0, "absent": 0, "present": 0}
    for i in range(limit):
        scene = scenes.make_scene(split, i)
        assert scene.image is not None  # held-out scenes are drawn
        request = GenerationRequest("c0", user_message(prompt), [scene.image], off, SamplingParams(max_tokens))
        caption = run_to_completion(model, [request])["c0"].token_ids
        found = mentions(model, caption, set(scene.objects))
        counts["scenes"] += 1
        if not found:
            continue
        logp = forced_logprobs(model, scene.image, prompt, caption, [off, *settings.values()])
        for m in found:
            word = caption[m.position]
            counts["present" if m.present else "absent"] += 1
            for k, shift in enumerate(shifts, start=1):
                delta = float(logp[k, m.position, word] - logp[0, m.position, word])
                moved = int(logp[k, m.position].argmax()) != word
                if m.present:
                    shift.present.append(delta)
                    shift.present_moved += moved
                else:
                    shift.absent.append(delta)
                    shift.absent_moved += moved
    return shifts, counts


def parse_settings(text: str, num_layers: int) -> dict[str, AlignmentParams]:
    out: dict[str, AlignmentParams] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        omega, start, kappa = item.split(":")
        params = resolve_alignment(
            None, num_layers, omega=float(omega), start_layer=int(start), kappa=float(kappa), contrast=False
        )
        out[f"w{omega}-s{start}-k{kappa}"] = params
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--split", default="counter-prior", choices=("in-prior", "counter-prior", "hard"))
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--levels", default="0.25,0.5,0.75,1", help="knob levels, mapped by the model's presets")
    parser.add_argument("--settings", default="", help="extra settings omega:start_layer:kappa, comma-separated")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = ReferenceModel.load(args.model)
    knobs = load_knob_map(args.model)
    settings = {
        f"c={c}": resolve_alignment(float(c), model.num_layers, contrast=False, knob_map=knobs)
        for c in args.levels.split(",")
        if c
    }
    settings.update(parse_settings(args.settings, model.num_layers))
    shifts, counts = measure(model, settings, args.split, args.limit, args.max_tokens)
    print(
        f"{args.model}, {args.split}, {counts['scenes']} scenes: {counts['absent']} mentions of absent objects, "
        f"{counts['present']} of present ones at c = 0 (contrast off; d = mean change of the word's log-prob)"
    )
    print("| setting | omega | start | kappa | d absent | d present | absent moved off | present moved off |")
    print("|---|---|---|---|---|---|---|---|")
    for s in shifts:
        r = s.summary()
        print(
            f"| {s.name} | {r['omega']:g} | {r['start_layer']} | {r['kappa']:g} | {r['dlogp_absent']} | "
            f"{r['dlogp_present']} | {r['moved_absent']} | {r['moved_present']} |"
        )
    if args.out:
        report = {"model": args.model, "split": args.split, "counts": counts}
        report["settings"] = {s.name: s.summary() for s in shifts}
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
