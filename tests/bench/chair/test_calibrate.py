"""`bench.chair calibrate`'s frontier, walk and presets document (the parts without a server)."""

from __future__ import annotations

from bench.chair.calibrate import OFF, Measured, Setting, frontier, presets_document, walk
from sevi.method.knob import KnobMap, parse_presets


def point(omega: float, layer: int, kappa: float, halluc: float, recall: float) -> Measured:
    row = {"chair_s": halluc, "chair_i": halluc / 2, "recall": recall, "len": 10.0}
    return Measured(Setting(omega, layer, kappa), halluc, recall, row)


BASE = Measured(OFF, 0.6, 0.8, {"chair_s": 0.6, "chair_i": 0.3, "recall": 0.8, "len": 12.0})


def test_frontier_drops_beaten_points_and_keeps_the_gentlest_of_equals() -> None:
    a = point(0.5, 2, 0.2, 0.5, 0.75)
    b = point(1.0, 2, 0.2, 0.4, 0.70)
    beaten = point(2.0, 1, 0.2, 0.45, 0.60)  # b hallucinates less and recalls more
    same_as_b = point(4.0, 1, 0.5, 0.4, 0.70)
    front = frontier([BASE, a, b, beaten, same_as_b])
    assert front == [BASE, a, b]


def test_walk_is_monotone_from_the_unmodified_model() -> None:
    a = point(0.5, 2, 0.2, 0.5, 0.75)
    b = point(1.0, 2, 0.2, 0.45, 0.72)
    c = point(4.0, 1, 0.5, 0.3, 0.5)
    worse = point(0.25, 2, 0.2, 0.7, 0.85)  # on the frontier (best recall) but more hallucinating than c = 0
    steps = walk(BASE, [worse, c, a, b])
    assert [p for _, p in steps] == [BASE, a, b, c]
    cs = [x for x, _ in steps]
    assert cs == [0.0, round(0.1 / 0.3, 4), 0.5, 1.0]
    assert all(q.hallucination < p.hallucination for (_, p), (_, q) in zip(steps, steps[1:], strict=False))


def test_walk_is_empty_when_nothing_hallucinates_less() -> None:
    assert walk(BASE, [point(1, 2, 0.2, 0.6, 0.9), point(4, 1, 0.2, 0.7, 0.5)]) == []


def test_presets_document_validates_and_serves_the_walk() -> None:
    a = point(0.5, 2, 0.2, 0.5, 0.75)
    b = point(1.0, 2, 0.2, 0.45, 0.72)
    c = point(4.0, 1, 0.5, 0.3, 0.5)
    doc = presets_document(walk(BASE, [a, b, c]), True, {"set": "test"})
    presets = parse_presets(doc, num_layers=4)
    first, last = presets.knots[0], presets.knots[-1]
    # c = 0 is the unmodified model; from there to the first knot only omega ramps (layer, kappa borrowed).
    assert (first.omega, first.start_layer, first.kappa) == (0.0, 2, 0.2)
    assert (last.c, last.omega, last.start_layer, last.kappa) == (1.0, 4.0, 1, 0.5)
    assert presets.balanced == 0.5 and presets.focused == 1.0  # the measured knot nearest 0.5
    assert [k.measured["chair_s"] for k in presets.knots if k.measured] == [0.6, 0.5, 0.45, 0.3]
    knobs = KnobMap(presets)
    assert knobs.point(presets.balanced, 4).omega == 1.0  # balanced is a measured setting, not a blend


def test_single_knot_walk_puts_balanced_half_way() -> None:
    doc = presets_document(walk(BASE, [point(2.0, 1, 0.2, 0.4, 0.7)]), False, {})
    presets = parse_presets(doc)
    assert [k.c for k in presets.knots] == [0.0, 1.0] and presets.balanced == 0.5 and not presets.contrast


def test_min_step_merges_knots_that_are_noise_apart() -> None:
    a = point(0.5, 2, 0.2, 0.58, 0.78)  # 0.02 below the unmodified model: not a step of 0.05
    b = point(1.0, 2, 0.2, 0.52, 0.75)
    c = point(2.0, 1, 0.2, 0.5, 0.7)  # 0.02 below b: replaces it as the last knot
    assert [p for _, p in walk(BASE, [a, b, c], min_step=0.05)] == [BASE, c]
    d = point(4.0, 1, 0.5, 0.4, 0.6)
    assert [p for _, p in walk(BASE, [a, b, c, d], min_step=0.05)] == [BASE, b, d]
    assert walk(BASE, [a], min_step=0.05) == []
    assert [p for _, p in walk(BASE, [a, b, c, d])] == [BASE, a, b, c, d]  # no margin: every frontier point
