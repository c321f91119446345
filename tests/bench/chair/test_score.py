"""CHAIR on hand-checked captions: synonyms, plurals, double words, hallucinations, recall, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.chair import caption_objects, compute_chair, load_coco_truth, partner_rate, singularize
from bench.chair.cli import main
from bench.coco_objects import CATEGORIES, SYNONYMS, WORD_TO_CATEGORY

# Four images checked by hand (mentions per caption in the comments).
TRUTH = {
    "1": ["person", "dog", "dining table"],
    "2": ["hot dog", "cup"],
    "3": ["teddy bear", "bed"],
    "4": ["bird"],
}
CAPTIONS = {
    "1": "A man is walking two puppies next to a dining table.",  # person, dog, dining table: all true
    "2": "Two hot dogs and a cat on a table.",  # hot dog (true); cat, dining table hallucinated
    "3": "A teddy bear lying on a bed next to a teddy bear.",  # teddy bear, bed, teddy bear: all true
    "4": "A baby bird sitting on a bench.",  # bird (not person), bench hallucinated
}


def test_vocabulary_is_the_80_coco_categories() -> None:
    assert len(CATEGORIES) == 80
    assert WORD_TO_CATEGORY["puppy"] == "dog"
    assert WORD_TO_CATEGORY["table"] == "dining table"
    assert WORD_TO_CATEGORY["man"] == "person"
    assert all(words[0] == cat for cat, words in SYNONYMS.items())


@pytest.mark.parametrize(
    ("plural", "singular"),
    [
        ("puppies", "puppy"),
        ("knives", "knife"),
        ("men", "man"),
        ("women", "woman"),
        ("buses", "bus"),
        ("glasses", "glass"),
        ("benches", "bench"),
        ("skis", "skis"),
        ("scissors", "scissors"),
        ("bus", "bus"),
        ("tennis", "tennis"),
        ("dogs", "dog"),
        ("lorries", "lorry"),
        ("toothbrushes", "toothbrush"),
        ("ties", "tie"),
        ("people", "person"),
        ("children", "child"),
        ("couches", "couch"),
        ("tvs", "tv"),
        ("sheep", "sheep"),
    ],
)
def test_singularize(plural: str, singular: str) -> None:
    assert singularize(plural) == singular


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("Two hot dogs on a plate.", ["hot dog"]),  # not a dog
        ("A teddy bear and a brown bear.", ["teddy bear", "bear"]),
        ("A dining table with wine glasses and forks.", ["dining table", "wine glass", "fork"]),
        ("A baby elephant next to an adult giraffe.", ["elephant", "giraffe"]),  # no person
        ("The toilet seat is up.", ["toilet"]),  # no chair
        ("A passenger train at the station.", ["train"]),  # no person
        ("A man wearing a bow tie.", ["person", "tie"]),
        ("Two women holding cell phones.", ["person", "cell phone"]),
        ("A sofa, a TV and a puppy.", ["couch", "tv", "dog"]),
        ("A street light near a fire hydrant and a stop sign.", ["traffic light", "fire hydrant", "stop sign"]),
        ("A bus, a taxi and three bikes.", ["bus", "car", "bicycle"]),
        ("", []),
    ],
)
def test_caption_objects(caption: str, expected: list[str]) -> None:
    assert [cat for _, cat in caption_objects(caption)] == expected


def test_compute_chair_by_hand() -> None:
    res = compute_chair(CAPTIONS, TRUTH)
    assert res.n == 4
    assert res.chair_s == pytest.approx(2 / 4)
    assert res.chair_i == pytest.approx(3 / 11)  # 3 hallucinated of 3 + 3 + 3 + 2 mentions
    assert res.recall == pytest.approx(7 / 8)  # 3 + 1 + 2 + 1 of 3 + 2 + 2 + 1 true objects
    assert res.len == pytest.approx((11 + 9 + 12 + 7) / 4)
    by_id = {i.image_id: i for i in res.images}
    assert by_id["2"].hallucinated == ["cat", "dining table"]
    assert by_id["2"].recalled == ["hot dog"]
    assert by_id["3"].mentioned == ["teddy bear", "bed", "teddy bear"]
    assert by_id["4"].hallucinated == ["bench"]


def test_missing_truth_is_an_error() -> None:
    with pytest.raises(KeyError):
        compute_chair({"x": "a dog"}, {})


def test_partner_rate() -> None:
    caps = {"a": "A fork and a knife.", "b": "A fork.", "c": "A dog."}
    assert partner_rate(caps, {"a": ["knife"], "b": ["knife"], "c": []}) == pytest.approx(0.5)


def _write_inputs(tmp: Path) -> tuple[Path, Path]:
    caps = tmp / "caps.jsonl"
    caps.write_text("".join(json.dumps({"image_id": k, "caption": v}) + "\n" for k, v in CAPTIONS.items()))
    truth = tmp / "truth.json"
    truth.write_text(json.dumps(TRUTH))
    return caps, truth


def test_score_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    caps, truth = _write_inputs(tmp_path)
    assert main(["score", "--captions", str(caps), "--truth", str(truth)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["chair_s"] == pytest.approx(0.5)
    assert out["chair_i"] == pytest.approx(3 / 11)
    assert out["recall"] == pytest.approx(7 / 8)
    assert out["len"] == pytest.approx(9.75)
    assert len(out["images"]) == 4


def test_score_command_as_module(tmp_path: Path) -> None:
    caps, truth = _write_inputs(tmp_path)
    # Truth values may also be objects with an "objects" list (as in richer metadata files).
    truth.write_text(json.dumps({k: {"objects": v, "context": "x"} for k, v in TRUTH.items()}))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.chair",
            "score",
            "--captions",
            str(caps),
            "--truth",
            str(truth),
            "--summary-only",
            "--compact",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(run.stdout) == {"chair_s": 0.5, "chair_i": 3 / 11, "recall": 7 / 8, "len": 9.75, "n": 4}


def test_load_coco_truth(tmp_path: Path) -> None:
    ann = tmp_path / "annotations"
    ann.mkdir()
    (ann / "instances_val2014.json").write_text(
        json.dumps(
            {
                "images": [{"id": 42}, {"id": 73}, {"id": 99}],
                "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 62, "name": "chair"}],
                "annotations": [
                    {"image_id": 42, "category_id": 1},
                    {"image_id": 42, "category_id": 18},
                    {"image_id": 42, "category_id": 1},
                    {"image_id": 73, "category_id": 62},
                ],
            }
        )
    )
    (ann / "captions_val2014.json").write_text(
        json.dumps(
            {
                "annotations": [
                    {"image_id": 73, "caption": "A cat sleeping on a chair."},
                    {"image_id": 99, "caption": "An empty room."},
                ],
            }
        )
    )
    assert load_coco_truth(tmp_path) == {"42": ["dog", "person"], "73": ["cat", "chair"], "99": []}
    assert load_coco_truth(tmp_path, use_captions=False)["73"] == ["chair"]
    assert load_coco_truth(tmp_path, image_ids=[42]) == {"42": ["dog", "person"]}
