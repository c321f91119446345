"""The synthetic scene generator: determinism, category design, priors, splits, captions, output files."""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from bench.chair import caption_objects, compute_chair, load_truth
from training import scenes


def test_deterministic_and_varied() -> None:
    a, b = scenes.make_scene("train", 7), scenes.make_scene("train", 7)
    assert a.caption == b.caption and a.objects == b.objects
    assert a.image is not None and b.image is not None
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.image.size == (scenes.IMAGE_SIZE, scenes.IMAGE_SIZE)
    c = scenes.make_scene("train", 8)
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))
    # Splits draw from different seeds: index 7 of another split is another scene.
    assert scenes.make_scene("in-prior", 7).image_id != a.image_id
    # Rendering draws last, so composition does not depend on it.
    assert scenes.make_scene("hard", 3, render=False).caption == scenes.make_scene("hard", 3).caption


def test_category_design() -> None:
    cats = scenes.CATEGORIES
    assert len(cats) >= 24
    assert len(scenes.CONTEXTS) >= 4
    assert {c.context for c in cats.values()} == set(scenes.CONTEXTS)
    assert len({c.draw for c in cats.values()}) == len(cats)  # one drawing routine per category
    for context, pairs in scenes.PAIRS.items():
        for anchor, partner in pairs:
            assert cats[anchor].context == context == cats[partner].context


def _silhouette(name: str) -> np.ndarray:
    """Binary mask of a category drawn alone, at its usual aspect, centred in a 64x64 canvas."""
    img = Image.new("RGB", (64, 64), (255, 255, 255))
    cat = scenes.CATEGORIES[name]
    w, h = (60, 60 / cat.aspect) if cat.aspect >= 1 else (60 * cat.aspect, 60)
    box = (32 - w / 2, 32 - h / 2, 32 + w / 2, 32 + h / 2)
    cat.draw(ImageDraw.Draw(img), box, (0, 0, 0), np.random.default_rng(0))
    return np.asarray(img).min(axis=2) < 250


def test_no_two_categories_share_a_shape() -> None:
    masks = {n: _silhouette(n) for n in scenes.CATEGORIES}
    for a, b in combinations(masks, 2):
        iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
        # Blocky objects fill their boxes, so even different shapes overlap a lot (bus vs couch 0.81);
        # this catches two categories drawn alike.
        assert iou < 0.85, (a, b, iou)


def test_caption_nouns_are_coco_synonyms_of_their_category() -> None:
    for name, cat in scenes.CATEGORIES.items():
        for singular, plural in cat.nouns:
            for noun in (f"a {singular}", f"two {plural}"):
                assert [c for _, c in caption_objects(noun)] == [name], noun


@pytest.mark.parametrize("split", scenes.SPLITS)
def test_captions_name_exactly_the_objects(split: str) -> None:
    sc = [scenes.make_scene(split, i, render=False) for i in range(150)]
    res = compute_chair({s.image_id: s.caption for s in sc}, {s.image_id: s.objects for s in sc})
    assert res.chair_s == 0.0 and res.recall == 1.0
    assert len({s.caption for s in sc}) >= 0.95 * len(sc)  # varied sentences


def test_captions_use_synonyms_and_plurals() -> None:
    words = " ".join(scenes.make_scene("train", i, render=False).caption for i in range(400)).split()
    for w in ("puppy", "sofa", "man", "table", "bike", "television"):
        assert w in words
    assert any(w in words for w in ("men", "puppies", "knives", "buses", "benches"))


def test_training_prior() -> None:
    stats = scenes.split_stats("train", 4000)
    assert stats["partner_given_anchor"] == pytest.approx(scenes.PARTNER_RATE, abs=0.03)
    assert 1.5 < stats["objects"] < 4.0


def test_held_out_splits() -> None:
    for i in range(100):
        s = scenes.make_scene("in-prior", i, render=False)
        assert s.anchors and all(scenes.PARTNER_OF[a] in s.objects for a in s.anchors)
        c = scenes.make_scene("counter-prior", i, render=False)
        assert len(c.absent_partners) == 1
        assert c.absent_partners[0] not in c.objects
        assert scenes.ANCHOR_OF[c.absent_partners[0]] in c.objects
        h = scenes.make_scene("hard", i, render=False)
        assert any(x.small or x.occluded for x in h.instances)
        assert all(x.small or x.occluded for x in h.instances)


def test_caption_names_partner_right_after_anchor() -> None:
    for i in range(200):
        s = scenes.make_scene("in-prior", i, render=False)
        mentions = [c for _, c in caption_objects(s.caption)]
        for a in s.anchors:
            assert mentions[mentions.index(a) + 1] == scenes.PARTNER_OF[a], s.caption


def test_write_split(tmp_path: Path) -> None:
    out = scenes.write_split("counter-prior", tmp_path / "cp", 5)
    truth = load_truth(out / "truth.json")
    meta = json.loads((out / "meta.json").read_text())
    assert sorted(truth) == [f"counter-prior-{i:05d}" for i in range(5)]
    for image_id, objects in truth.items():
        img = Image.open(out / f"{image_id}.png")
        assert img.size == (96, 96) and img.mode == "RGB"
        assert objects == scenes.make_scene("counter-prior", int(image_id[-5:]), render=False).objects
        assert meta[image_id]["absent_partners"] and meta[image_id]["absent_partners"][0] not in objects
        assert caption_objects(meta[image_id]["caption"])


def test_vocabulary_covers_captions() -> None:
    vocab = set(scenes.caption_vocabulary())
    for split in scenes.SPLITS:
        for i in range(200):
            cap = scenes.make_scene(split, i, render=False).caption
            words = cap.replace(",", " , ").replace(".", " . ").split()
            assert set(words) <= vocab, cap
