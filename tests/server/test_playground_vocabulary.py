"""The object vocabulary the playground page marks words with (`server/playground/vocabulary.py`), held to the
CHAIR scorer: each surface form the page looks up must read as the same COCO category there."""

from __future__ import annotations

import json

import pytest

from bench.chair import caption_objects
from server.playground.vocabulary import plural, surface_forms, vocabulary_json
from sevi.evaluation.coco_objects import WORD_TO_CATEGORY

# Plurals the scorer's small singularizer does not undo ("magpies" -> "magpy"): the page still reads them as
# their object, so on these words alone the two disagree (the scorer reads nothing there).
SCORER_GAPS = frozenset({"airbuses", "minibuses", "magpies", "collies", "corgis", "zebus", "broccolis"})


def test_every_form_reads_as_the_scorer_reads_it() -> None:
    disagree = {}
    for form, category in surface_forms().items():
        scorer = [c for _, c in caption_objects(form)]
        if scorer != ([category] if category else []):
            disagree[form] = (category, scorer)
    assert set(disagree) == SCORER_GAPS, disagree
    assert all(scorer == [] for _, scorer in disagree.values())


def test_every_one_word_synonym_and_common_plural_is_listed() -> None:
    forms = surface_forms()
    assert {w for w in WORD_TO_CATEGORY if " " not in w} <= set(forms)
    for word, category in (
        ("dogs", "dog"),
        ("puppies", "dog"),
        ("knives", "knife"),
        ("people", "person"),
        ("men", "person"),
        ("buses", "bus"),
        ("couches", "couch"),
        ("hot dogs", "hot dog"),
        ("teddy bears", "teddy bear"),
        ("baby birds", "bird"),
        ("sheep", "sheep"),
    ):
        assert forms[word] == category, word
    # Phrases that name no object are listed so that the page skips them whole, as the scorer does.
    assert forms["train track"] is None and forms["home plate"] is None
    assert "blow drier" not in forms  # a synonym of two words the scorer never merges: it never matches there


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("dog", "dogs"),
        ("bus", "buses"),
        ("bench", "benches"),
        ("puppy", "puppies"),
        ("turkey", "turkeys"),
        ("policeman", "policemen"),
        ("doberman", "dobermans"),
        ("knife", "knives"),
        ("sheep", "sheep"),
        ("teddy bear", "teddy bears"),
        ("child", "children"),
    ],
)
def test_plural(word: str, expected: str) -> None:
    assert plural(word) == expected


def test_served_json_is_the_table() -> None:
    assert json.loads(vocabulary_json()) == {"objects": surface_forms()}
