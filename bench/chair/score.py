"""CHAIR: object hallucination in captions (spec section 6; Rohrbach et al. 2018).

A caption is lower-cased, split into words, singularized, two-word phrases are merged ("hot dog",
"teddy bear", "dining table"), and every word that is a COCO synonym becomes a mention of its category.
A mention whose category is not in the image's ground truth is hallucinated.

- CHAIR_S: share of captions with at least one hallucinated mention.
- CHAIR_I: hallucinated mentions / all mentions (every mention counts, as in the reference).
- Recall: distinct true categories mentioned / true categories, summed over all images.
- len: average caption length in words (whitespace split).

    python -m bench.chair score --captions caps.jsonl --truth truth.json

Ground truth comes from the scene generator (`training.scenes.write_split` writes `truth.json`) or from
a local COCO folder (`load_coco_truth`). The command line is bench/chair/cli.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.coco_objects import DOUBLE_WORD_MAP, WORD_TO_CATEGORY

# ------------------------------------------------------------------------------------ singularizing
# No NLTK / pattern data can be downloaded here, so plurals are undone by a small rule set that covers
# the COCO vocabulary: irregular forms first, then suffix rules, and known words are left alone.
_IRREGULAR = {
    "men": "man",
    "women": "woman",
    "children": "child",
    "people": "person",
    "feet": "foot",
    "teeth": "tooth",
    "mice": "mouse",
    "geese": "goose",
    "oxen": "ox",
    "knives": "knife",
    "wives": "wife",
    "leaves": "leaf",
    "shelves": "shelf",
    "calves": "calf",
    "wolves": "wolf",
    "halves": "half",
    "loaves": "loaf",
    "scarves": "scarf",
    "lives": "life",
    "policemen": "policeman",
    "gentlemen": "gentleman",
    "servicemen": "serviceman",
    "firemen": "fireman",
    "grandchildren": "grandchild",
    "dice": "die",
    "buses": "bus",
    "glasses": "glass",
    "dishes": "dish",
    "benches": "bench",
    "couches": "couch",
    "sandwiches": "sandwich",
    "toothbrushes": "toothbrush",
    "boxes": "box",
    "foxes": "fox",
    "tomatoes": "tomato",
    "potatoes": "potato",
    "sheep": "sheep",
    "species": "species",
    "skis": "skis",
    "scissors": "scissors",
    "series": "series",
    "cattle": "cattle",
    "ties": "tie",
    "pies": "pie",
    "taxis": "taxi",
}
# Words ending in "s" that are already singular (or the plural and singular coincide).
_KEEP_S = ("ss", "us", "is", "ous", "ics")


def singularize(word: str) -> str:
    """Singular form of a lower-case English noun, good enough for the COCO object vocabulary."""
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if len(word) <= 2 or not word.endswith("s") or word.endswith(_KEEP_S):
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"  # puppies -> puppy, lorries -> lorry
    if word.endswith(("ches", "shes", "sses", "xes", "zzes")):
        return word[:-2]  # watches -> watch, glasses -> glass
    if word.endswith("ves") and word[:-3] + "fe" in WORD_TO_CATEGORY:
        return word[:-3] + "fe"
    return word[:-1]


_TOKEN = re.compile(r"[a-z]+")


def caption_words(caption: str) -> list[str]:
    """Lower-cased, singularized words with two-word phrases merged (the reference's preprocessing)."""
    words = [singularize(w) for w in _TOKEN.findall(caption.lower())]
    merged: list[str] = []
    i = 0
    while i < len(words):
        pair = " ".join(words[i : i + 2])
        if i + 1 < len(words) and pair in DOUBLE_WORD_MAP:
            merged.append(DOUBLE_WORD_MAP[pair])
            i += 2
        else:
            merged.append(words[i])
            i += 1
    # "the seat of the toilet" must not count as a chair (reference rule).
    if "toilet" in merged and "seat" in merged:
        merged = [w for w in merged if w != "seat"]
    return merged


def caption_objects(caption: str) -> list[tuple[str, str]]:
    """Every COCO mention in the caption, in order, as (surface word, category)."""
    return [(w, WORD_TO_CATEGORY[w]) for w in caption_words(caption) if w in WORD_TO_CATEGORY]


# ------------------------------------------------------------------------------------------ scoring
@dataclass
class ImageScore:
    image_id: str
    caption: str
    mentioned: list[str]  # categories, in order, one per mention
    hallucinated: list[str]  # categories not in the truth, one per mention
    recalled: list[str]  # distinct true categories mentioned
    truth: list[str]
    words: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ChairResult:
    chair_s: float
    chair_i: float
    recall: float
    len: float
    n: int
    images: list[ImageScore]

    def summary(self) -> dict[str, float | int]:
        return {"chair_s": self.chair_s, "chair_i": self.chair_i, "recall": self.recall, "len": self.len, "n": self.n}

    def to_json(self) -> dict[str, Any]:
        return {**self.summary(), "images": [asdict(i) for i in self.images]}


def score_caption(image_id: str, caption: str, truth: Sequence[str]) -> ImageScore:
    truth_set = set(truth)
    mentioned = [cat for _, cat in caption_objects(caption)]
    return ImageScore(
        image_id=image_id,
        caption=caption,
        mentioned=mentioned,
        hallucinated=[c for c in mentioned if c not in truth_set],
        recalled=sorted(set(mentioned) & truth_set),
        truth=sorted(truth_set),
        words=len(caption.split()),
    )


def compute_chair(captions: Mapping[str, str], truth: Mapping[str, Sequence[str]]) -> ChairResult:
    """Score captions (image_id -> caption) against truth (image_id -> COCO categories)."""
    missing = [k for k in captions if k not in truth]
    if missing:
        raise KeyError(f"{len(missing)} captioned images have no ground truth, e.g. {missing[:3]}")
    images = [score_caption(k, cap, truth[k]) for k, cap in captions.items()]
    n = len(images)
    mentions = sum(len(i.mentioned) for i in images)
    true_total = sum(len(i.truth) for i in images)
    return ChairResult(
        chair_s=sum(bool(i.hallucinated) for i in images) / n if n else 0.0,
        chair_i=sum(len(i.hallucinated) for i in images) / mentions if mentions else 0.0,
        recall=sum(len(i.recalled) for i in images) / true_total if true_total else 0.0,
        len=sum(i.words for i in images) / n if n else 0.0,
        n=n,
        images=images,
    )


def partner_rate(captions: Mapping[str, str], absent_partners: Mapping[str, Sequence[str]]) -> float:
    """Share of captions that name an absent usual partner (counter-prior scenes), over captions with one."""
    scored = [(k, v) for k, v in absent_partners.items() if v and k in captions]
    if not scored:
        return 0.0
    hits = sum(bool({c for _, c in caption_objects(captions[k])} & set(v)) for k, v in scored)
    return hits / len(scored)


# ------------------------------------------------------------------------------------- input files
def load_captions(path: str | Path) -> dict[str, str]:
    """JSON lines of {"image_id": ..., "caption": ...}; ids are kept as strings."""
    out: dict[str, str] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                out[str(row["image_id"])] = row["caption"]
    return out


def load_truth(path: str | Path) -> dict[str, list[str]]:
    """image_id -> categories; a value may also be an object with an "objects" list."""
    raw = json.loads(Path(path).read_text())
    return {str(k): list(v["objects"] if isinstance(v, dict) else v) for k, v in raw.items()}


def load_coco_truth(
    coco_dir: str | Path, split: str = "val2014", image_ids: Iterable[int] | None = None, use_captions: bool = True
) -> dict[str, list[str]]:
    """Ground truth from a local COCO folder: `annotations/instances_<split>.json` (segmentation labels),
    plus, as in the reference, the COCO objects named in the human captions (`captions_<split>.json`)."""
    ann = Path(coco_dir) / "annotations"
    inst = json.loads((ann / f"instances_{split}.json").read_text())
    names = {c["id"]: c["name"] for c in inst["categories"]}
    wanted = None if image_ids is None else {int(i) for i in image_ids}
    truth: dict[str, set[str]] = {}
    for img in inst.get("images", []):
        if wanted is None or img["id"] in wanted:
            truth[str(img["id"])] = set()
    for a in inst["annotations"]:
        key = str(a["image_id"])
        if key in truth:
            truth[key].add(names[a["category_id"]])
    cap_file = ann / f"captions_{split}.json"
    if use_captions and cap_file.exists():
        for a in json.loads(cap_file.read_text())["annotations"]:
            key = str(a["image_id"])
            if key in truth:
                truth[key].update(cat for _, cat in caption_objects(a["caption"]))
    return {k: sorted(v) for k, v in truth.items()}
