"""The object vocabulary the playground page matches caption words against, as one JSON table.

The page compares captions by COCO category, as the CHAIR scorer reads them ("puppy" and "dog" are one
object). Rather than re-implement the scorer's singularizer in JavaScript, the page gets every surface
form it should recognise, plurals included, already mapped to its category: it only looks words up.
The tests hold this table to the scorer: every form here reads as the same category there.
"""

from __future__ import annotations

import json
from functools import cache

from sevi.evaluation.coco_objects import DOUBLE_WORD_MAP, WORD_TO_CATEGORY

# Plurals that no suffix rule gives. Words whose plural is the same, or that are plural already, map to
# themselves ("sheep", "skis", "scissors", "cattle", "people").
_IRREGULAR_PLURALS = {
    "child": "children",
    "person": "people",
    "mouse": "mice",
    "goose": "geese",
    "ox": "oxen",
    "knife": "knives",
    "calf": "calves",
    "grandchild": "grandchildren",
    "sheep": "sheep",
    "skis": "skis",
    "scissors": "scissors",
    "cattle": "cattle",
    "oxen": "oxen",
    "people": "people",
    "children": "children",
    "knives": "knives",
    "bison": "bison",
    "doberman": "dobermans",
}
# A key of the scorer's phrase table that only its singularizer produces ("wine glasses" -> "wine glas"):
# captions never contain it.
_SINGULARIZER_ARTEFACTS = frozenset({"wine glas"})


def plural(word: str) -> str:
    """The plural of one lower-case English noun of the COCO vocabulary (the last word of a phrase)."""
    head, _, last = word.rpartition(" ")
    prefix = head + " " if head else ""
    if last in _IRREGULAR_PLURALS:
        return prefix + _IRREGULAR_PLURALS[last]
    if last.endswith("man"):
        return prefix + last[:-3] + "men"  # policeman -> policemen
    if last.endswith(("s", "x", "z", "ch", "sh")):
        return prefix + last + "es"  # bus -> buses, couch -> couches
    if last.endswith("y") and last[-2:-1] not in ("a", "e", "i", "o", "u"):
        return prefix + last[:-1] + "ies"  # puppy -> puppies; turkey -> turkeys
    return prefix + last + "s"


def surface_forms() -> dict[str, str | None]:
    """Lower-case word or two-word phrase -> COCO category; None for phrases that name no object.

    Two-word phrases are listed so the page reads them first, as the scorer merges them: "hot dog" is not
    a dog, "train track" is no train (it maps to None), a "baby bird" is a bird and not a person.
    """
    forms: dict[str, str | None] = {}
    for word, category in WORD_TO_CATEGORY.items():
        # Synonyms of several words that the scorer does not merge ("blow drier") never match there either.
        if " " in word:
            continue
        forms[word] = category
        if not (word.endswith("s") and word[:-1] in WORD_TO_CATEGORY):  # "bikes" is a plural already
            forms.setdefault(plural(word), category)
    for phrase, reads_as in DOUBLE_WORD_MAP.items():
        if phrase.count(" ") != 1 or phrase in _SINGULARIZER_ARTEFACTS:
            continue  # the scorer merges pairs of words only: "stove top oven" is read word by word
        names = WORD_TO_CATEGORY.get(reads_as)
        forms.setdefault(phrase, names)
        forms.setdefault(plural(phrase), names)
    return forms


@cache
def vocabulary_json() -> bytes:
    """The table the page loads (`GET /playground/vocabulary.json`), built once per process."""
    return json.dumps({"objects": surface_forms()}, separators=(",", ":"), sort_keys=True).encode()
