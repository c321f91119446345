"""Seeded procedural scenes of COCO objects with ground truth, for training and CHAIR evaluation.

Every image is drawn with PIL from a seed alone: `make_scene(split, index)` always returns the same
pixels, object list and caption, so any split can be regenerated instead of shipped.

Design (issue 5, part 1):
- 28 COCO categories in 4 contexts (kitchen, street, park, living room), 7 per context. Each category
  has its own silhouette; no two share a shape (a shared shape made the model confuse categories in
  the feasibility run, see shared/notes/tiny-training.md). Size, aspect, position, colour, overlap and
  background clutter are jittered.
- Co-occurrence priors: each context has two (anchor, partner) pairs, e.g. fork -> knife. In training
  scenes the partner comes with its anchor 90% of the time, and captions name the partner right after
  the anchor ("a fork next to a knife"), as real captions do; this is what a language prior learns.
- Captions are varied sentences that use COCO synonyms and plurals ("a puppy", "two men", "a sofa").
- Images are 96x96 RGB: with CLIP patch 16 that is 6x6 = 36 image tokens.

Splits (index i of split s is drawn from the seed `[SEED, split number, i]`):

=============  =======  ===============================================================================
split          size     content
=============  =======  ===============================================================================
train          stream   unbounded: the trainer draws scene `i` for its i-th sample (see the model card
                        for how many were seen); 1-5 categories (+10% a second instance), anchors 50%
                        per pair, partner | anchor 90%, partner alone 15%, 5% of scenes get one object
                        from another context; object size 16-36 px (longer side)
in-prior       300      same distribution, but at least one anchor and every anchor with its partner
counter-prior  300      exactly one anchor whose usual partner is absent (`absent_partners` in meta);
                        the other pair follows the prior
hard           300      in-prior composition; every object either small (9-14 px) or 20-32 px with
                        40-55% of it hidden behind an occluding slab (`hard` in meta)
=============  =======  ===============================================================================

Statistics (`python -m training.scenes stats SPLIT`; means per image; seed 1234):

=============  ==========  =======  ===============  ==================================================
split          categories  anchors  P(partner|anch)  other
=============  ==========  =======  ===============  ==================================================
train (first   3.05        1.00     0.903            each anchor/partner category in ~13% of scenes,
20,000)                                              each other category in ~8%
in-prior       3.40        1.47     1.000
counter-prior  2.88        1.46     0.315            absent partner: remote 43, potted plant 43, kite 41,
                                                     knife 39, traffic light 36, stop sign 36, spoon 34,
                                                     frisbee 28
hard           3.44        1.52     1.000            1.84 small and 1.69 occluded instances per image
=============  ==========  =======  ===============  ==================================================

`write_split(split, out_dir, n)` writes `NAME.png` images, `truth.json` (image_id -> list of COCO
category names, the format `python -m bench.chair score --truth` reads) and `meta.json` (image_id ->
context, anchors, absent partners, hard objects, instances with boxes, reference caption).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SEED = 1234
IMAGE_SIZE = 96
_SS = 2  # supersampling factor: draw at 2x, downscale with a box filter for clean edges
SPLITS = ("train", "in-prior", "counter-prior", "hard")
HELD_OUT_SIZES = {"in-prior": 300, "counter-prior": 300, "hard": 300}
PARTNER_RATE = 0.9

Colour = tuple[int, int, int]
Box = tuple[float, float, float, float]
# A drawer paints one object into box (x0, y0, x1, y1) at supersampled scale.
Drawer = Callable[[ImageDraw.ImageDraw, Box, Colour, np.random.Generator], None]


# ----------------------------------------------------------------------------------------- drawing
def _pt(box: Box, u: float, v: float) -> tuple[float, float]:
    x0, y0, x1, y1 = box
    return (x0 + u * (x1 - x0), y0 + v * (y1 - y0))


def _rect(box: Box, u0: float, v0: float, u1: float, v1: float) -> list[tuple[float, float]]:
    return [_pt(box, u0, v0), _pt(box, u1, v1)]


def _shade(c: Colour, f: float) -> Colour:
    return (int(min(255, c[0] * f)), int(min(255, c[1] * f)), int(min(255, c[2] * f)))


def _lw(box: Box, frac: float) -> int:
    return max(2, int(frac * max(box[2] - box[0], box[3] - box[1])))


def _fork(d: ImageDraw.ImageDraw, b: Box, c: Colour, r: np.random.Generator) -> None:
    d.rectangle(_rect(b, 0.42, 0.45, 0.58, 1.0), fill=c)
    d.rectangle(_rect(b, 0.1, 0.3, 0.9, 0.46), fill=c)
    for u in (0.1, 0.42, 0.74):
        d.rectangle(_rect(b, u, 0.0, u + 0.16, 0.32), fill=c)


def _knife(d: ImageDraw.ImageDraw, b: Box, c: Colour, r: np.random.Generator) -> None:
    d.polygon([_pt(b, 0.3, 0.6), _pt(b, 0.3, 0.1), _pt(b, 0.55, 0.0), _pt(b, 0.8, 0.2), _pt(b, 0.7, 0.6)], fill=c)
    d.rectangle(_rect(b, 0.22, 0.6, 0.78, 1.0), fill=_shade(c, 0.45))


def _spoon(d: ImageDraw.ImageDraw, b: Box, c: Colour, r: np.random.Generator) -> None:
    d.ellipse(_rect(b, 0.05, 0.0, 0.95, 0.42), fill=c)
    d.rectangle(_rect(b, 0.4, 0.38, 0.6, 1.0), fill=c)


def _cup(d: ImageDraw.ImageDraw, b: Box, c: Colour, r: np.random.Generator) -> None:
    d.ellipse(_rect(b, 0.55, 0.3, 0.98, 0.72), outline=c, width=_lw(b, 0.1))
    d.polygon([_pt(b, 0.02, 0.15), _pt(b, 0.72, 0.15), _pt(b, 0.64, 0.98), _pt(b, 0.1, 0.98)], fill=c)


def _bowl(d: ImageDraw.ImageDraw, b: Box, c: Colour, r: np.random.Generator) -> None:
    d.chord(_rect(b, 0.0, -0.5, 1.0, 1.0), 0, 180, fill=c)
    d.rectangle(_rect(b, 0.0, 0.22, 1.0, 0.32), fill=_shade(c, 0.6))


def _bottle(d: ImageDraw.ImageDraw, b: Box, c: Colour, r: np.random.Generator) -> None:
    d.rounded_rectangle(_rect(b, 0.08, 0.38, 0.92, 1.0), radius=_lw(b, 0.08), fill=c)
    d.polygon([_pt(b, 0.08, 0.42), _pt(b, 0.35, 0.22), _pt(b, 0.65, 0.22), _pt(b, 0.92, 0.42)], fill=c)
    d.rectangle(_rect(b, 0.36, 0.0, 0.64, 0.25), fill=c)
    d.rectangle(_rect(b, 0.32, 0.0, 0.68, 0.08), fill=_shade(c, 0.4))
    d.rectangle(_rect(b, 0.08, 0.58, 0.92, 0.78), fill=(235, 235, 225))  # label


def _table(d: ImageDraw.ImageDraw, b: Box, c: Colour, r: np.random.Generator) -> None:
    d.rectangle(_rect(b, 0.0, 0.2, 1.0, 0.38), fill=c)
    d.rectangle(_rect(b, 0.06, 0.38, 0.16, 1.0), fill=_shade(c, 0.75))
    d.rectangle(_rect(b, 0.84, 0.38, 0.94, 1.0), fill=_shade(c, 0.75))


def _wheel(d: ImageDraw.ImageDraw, b: Box, u: float, v: float, rad: float) -> None:
    cx, cy = _pt(b, u, v)
    rr = rad * (b[2] - b[0])
    d.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=(25, 25, 25))


def _car(d: ImageDraw.ImageDraw, b: Box, c: Colour, r: np.random.Generator) -> None:
    d.polygon([_pt(b, 0.2, 0.48), _pt(b, 0.32, 0.12), _pt(b, 0.7, 0.12), _pt(b, 0.82, 0.48)], fill=c)
    d.polygon([_pt(b, 0.3, 0.45), _pt(b, 0.37, 0.2), _pt(b, 0.65, 0.2), _pt(b, 0.73, 0.45)], fill=(190, 220, 240))
    d.rounded_rectangle(_rect(b, 0.0, 0.44, 1.0, 0.82), radius=_lw(b, 0.06), fill=c)
    _wheel(d, b, 0.22, 0.82, 0.11)
    _wheel(d, b, 0.78, 0.82, 0.11)


def _traffic_light(d: ImageDraw.ImageDraw, b: Box, c: Colour, r: np.random.Generator) -> None:
    d.rectangle(_rect(b, 0.44, 0.7, 0.56, 1.0), fill=(70, 70, 70))
    d.rounded_rectangle(_rect(b, 0.08, 0.0, 0.92, 0.72), radius=_lw(b, 0.05), fill=c)
    for v, lamp in ((0.03, (230, 40, 30)), (0.26, (240, 200, 30)), (0.49, (40, 200, 70))):
        d.ellipse(_rect(b, 0.22, v, 0.78, v + 0.2), fill=lamp)


def _bus(d: ImageDraw.ImageDraw, b: Box, c: Colour, r: np.random.Generator) -> None:
    d.rounded_rectangle(_rect(b, 0.0, 0.05, 1.0, 0.85), radius=_lw(b, 0.04), fill=c)
    for i in range(5):
        u = 0.05 + i * 0.19
        d.rectangle(_rect(b, u, 0.15, u + 0.14, 0.42), fill=(200, 225, 240))
    d.rectangle(_rect(b, 0.0, 0.55, 1.0, 0.6), fill=_shade(c, 0.6))
    _wheel(d, b, 0.18, 0.86, 0.08)
    _wheel(d, b, 0.82, 0.86, 0.08)


def _stop_sign(d: ImageDraw.ImageDraw, b: Box, c: Colour, r: np.random.Generator) -> None:
    d.rectangle(_rect(b, 0.45, 0.6, 0.55, 1.0), fill=(120, 120, 120))
    cx, cy = _pt(b, 0.5, 0.36)
    rr = 0.5 * (b[2] - b[0])
    pts = [
        (cx + rr * math.cos(math.pi / 8 + k * math.pi / 4), cy + rr * math.sin(math.pi / 8 + k * math.pi / 4))
        for k in range(8)
    ]
    d.polygon(pts, fill=c)
    d.rectangle([cx - 0.6 * rr, cy - 0.14 * rr, cx + 0.6 * rr, cy + 0.14 * rr], fill=(245, 245, 245))


def _truck(d: ImageDraw.ImageDraw, b: Box, c: Colour, r: np.random.Generator) -> None:
    d.rectangle(_rect(b, 0.0, 0.0, 0.64, 0.8), fill=c)
    cab = _shade(c, 0.7)
    d.polygon([_pt(b, 0.66, 0.8), _pt(b, 0.66, 0.3), _pt(b, 0.88, 0.3), _pt(b, 1.0, 0.5), _pt(b, 1.0, 0.8)], fill=cab)
    d.polygon([_pt(b, 0.72, 0.48), _pt(b, 0.72, 0.36), _pt(b, 0.86, 0.36), _pt(b, 0.94, 0.48)], fill=(190, 220, 240))
    for u in (0.14, 0.46, 0.84):
        _wheel(d, b, u, 0.84, 0.08)


def _bicycle(d: ImageDraw.ImageDraw, b: Box, c: Colour, r: np.random.Generator) -> None:
    w = _lw(b, 0.05)
    for u in (0.2, 0.8):
        d.ellipse(_rect(b, u - 0.2, 0.42, u + 0.2, 0.98), outline=(30, 30, 30), width=w)
    frame = [_pt(b, 0.2, 0.7), _pt(b, 0.42, 0.3), _pt(b, 0.68, 0.3), _pt(b, 0.8, 0.7)]
    d.line(frame, fill=c, width=w)
    d.line([_pt(b, 0.2, 0.7), _pt(b, 0.5, 0.7), _pt(b, 0.42, 0.3)], fill=c, width=w)
    d.line([_pt(b, 0.5, 0.7), _pt(b, 0.68, 0.3)], fill=c, width=w)
    d.line([_pt(b, 0.64, 0.1), _pt(b, 0.68, 0.3)], fill=c, width=w)
    d.line([_pt(b, 0.58, 0.1), _pt(b, 0.74, 0.1)], fill=c, width=w)


def _hydrant(d: ImageDraw.ImageDraw, b: Box, c: Colour, r: np.random.Generator) -> None:
    d.pieslice(_rect(b, 0.25, 0.0, 0.75, 0.5), 180, 360, fill=c)
    d.rectangle(_rect(b, 0.25, 0.24, 0.75, 0.92), fill=c)
    d.rectangle(_rect(b, 0.0, 0.42, 1.0, 0.6), fill=_shade(c, 0.7))
    d.rectangle(_rect(b, 0.15, 0.88, 0.85, 1.0), fill=_shade(c, 0.7))


def _dog(d: ImageDraw.ImageDraw, b: Box, c: Colour, r: np.random.Generator) -> None:
    w = _lw(b, 0.06)
    for u in (0.2, 0.32, 0.56, 0.68):
        d.line([_pt(b, u, 0.6), _pt(b, u, 0.98)], fill=c, width=w)
    d.line([_pt(b, 0.12, 0.45), _pt(b, 0.0, 0.2)], fill=c, width=w)
    d.ellipse(_rect(b, 0.1, 0.35, 0.78, 0.7), fill=c)
    d.ellipse(_rect(b, 0.64, 0.12, 0.98, 0.5), fill=c)
    d.polygon([_pt(b, 0.68, 0.2), _pt(b, 0.74, 0.0), _pt(b, 0.82, 0.18)], fill=_shade(c, 0.6))
    d.ellipse(_rect(b, 0.82, 0.22, 0.88, 0.3), fill=(20, 20, 20))


def _frisbee(d: ImageDraw.ImageDraw, b: Box, c: Colour, r: np.random.Generator) -> None:
    d.ellipse(_rect(b, 0.0, 0.3, 1.0, 0.7), fill=c)
    d.ellipse(_rect(b, 0.2, 0.38, 0.8, 0.62), outline=_shade(c, 0.55), width=_lw(b, 0.04))


def _person(d: ImageDraw.ImageDraw, b: Box, c: Colour, r: np.random.Generator) -> None:
    w = _lw(b, 0.08)
    d.line([_pt(b, 0.5, 0.6), _pt(b, 0.15, 1.0)], fill=(40, 50, 90), width=w)
    d.line([_pt(b, 0.5, 0.6), _pt(b, 0.85, 1.0)], fill=(40, 50, 90), width=w)
    d.rectangle(_rect(b, 0.35, 0.26, 0.65, 0.62), fill=c)
    d.line([_pt(b, 0.0, 0.55), _pt(b, 0.36, 0.3), _pt(b, 0.64, 0.3), _pt(b, 1.0, 0.55)], fill=c, width=w)
    d.ellipse(_rect(b, 0.3, 0.0, 0.7, 0.25), fill=(230, 190, 150))


def _kite(d: ImageDraw.ImageDraw, b: Box, c: Colour, r: np.random.Generator) -> None:
    w = _lw(b, 0.03)
    d.line([_pt(b, 0.5, 0.7), _pt(b, 0.35, 0.8), _pt(b, 0.6, 0.9), _pt(b, 0.45, 1.0)], fill=(60, 60, 60), width=w)
    d.polygon([_pt(b, 0.5, 0.0), _pt(b, 1.0, 0.28), _pt(b, 0.5, 0.72), _pt(b, 0.0, 0.28)], fill=c)
    d.line([_pt(b, 0.5, 0.0), _pt(b, 0.5, 0.72)], fill=_shade(c, 0.5), width=w)
    d.line([_pt(b, 0.0, 0.28), _pt(b, 1.0, 0.28)], fill=_shade(c, 0.5), width=w)


def _bench(d: ImageDraw.ImageDraw, b: Box, c: Colour, r: np.random.Generator) -> None:
    dark = _shade(c, 0.6)
    for u in (0.08, 0.86):
        d.rectangle(_rect(b, u, 0.1, u + 0.06, 1.0), fill=dark)
    d.rectangle(_rect(b, 0.0, 0.08, 1.0, 0.22), fill=c)
    d.rectangle(_rect(b, 0.0, 0.3, 1.0, 0.42), fill=c)
    d.rectangle(_rect(b, 0.0, 0.58, 1.0, 0.72), fill=c)


def _bird(d: ImageDraw.ImageDraw, b: Box, c: Colour, r: np.random.Generator) -> None:
    w = _lw(b, 0.09)
    d.line(
        [_pt(b, 0.0, 0.3), _pt(b, 0.25, 0.1), _pt(b, 0.5, 0.5), _pt(b, 0.75, 0.1), _pt(b, 1.0, 0.3)],
        fill=c,
        width=w,
        joint="curve",
    )
    d.ellipse(_rect(b, 0.4, 0.4, 0.6, 0.75), fill=c)


def _umbrella(d: ImageDraw.ImageDraw, b: Box, c: Colour, r: np.random.Generator) -> None:
    w = _lw(b, 0.05)
    d.line([_pt(b, 0.5, 0.4), _pt(b, 0.5, 0.92)], fill=(50, 50, 50), width=w)
    d.arc(_rect(b, 0.3, 0.8, 0.5, 1.0), 0, 180, fill=(50, 50, 50), width=w)
    d.pieslice(_rect(b, 0.0, 0.0, 1.0, 0.9), 180, 360, fill=c)
    for u in (0.0, 0.33, 0.66):
        d.chord(_rect(b, u, 0.36, u + 0.34, 0.54), 0, 180, fill=_shade(c, 0.7))


def _tv(d: ImageDraw.ImageDraw, b: Box, c: Colour, r: np.random.Generator) -> None:
    d.polygon([_pt(b, 0.35, 1.0), _pt(b, 0.42, 0.8), _pt(b, 0.58, 0.8), _pt(b, 0.65, 1.0)], fill=(50, 50, 50))
    d.rectangle(_rect(b, 0.0, 0.0, 1.0, 0.82), fill=c)
    d.rectangle(_rect(b, 0.07, 0.08, 0.93, 0.74), fill=(90, 150, 210))


def _remote(d: ImageDraw.ImageDraw, b: Box, c: Colour, r: np.random.Generator) -> None:
    d.rounded_rectangle(_rect(b, 0.0, 0.0, 1.0, 1.0), radius=_lw(b, 0.12), fill=c)
    d.ellipse(_rect(b, 0.3, 0.05, 0.7, 0.15), fill=(220, 40, 40))
    for v in (0.3, 0.45, 0.6, 0.75):
        for u in (0.18, 0.58):
            d.ellipse(_rect(b, u, v, u + 0.24, v + 0.08), fill=(200, 200, 200))


def _couch(d: ImageDraw.ImageDraw, b: Box, c: Colour, r: np.random.Generator) -> None:
    dark = _shade(c, 0.7)
    d.rectangle(_rect(b, 0.06, 0.85, 0.12, 1.0), fill=(60, 40, 20))
    d.rectangle(_rect(b, 0.88, 0.85, 0.94, 1.0), fill=(60, 40, 20))
    d.rounded_rectangle(_rect(b, 0.08, 0.0, 0.92, 0.55), radius=_lw(b, 0.06), fill=dark)
    d.rectangle(_rect(b, 0.1, 0.5, 0.9, 0.86), fill=c)
    d.rounded_rectangle(_rect(b, 0.0, 0.3, 0.16, 0.86), radius=_lw(b, 0.04), fill=dark)
    d.rounded_rectangle(_rect(b, 0.84, 0.3, 1.0, 0.86), radius=_lw(b, 0.04), fill=dark)


def _potted_plant(d: ImageDraw.ImageDraw, b: Box, c: Colour, r: np.random.Generator) -> None:
    for k in range(5):
        ang = math.pi * (0.1 + 0.2 * k)
        tip = (0.5 - 0.48 * math.cos(ang), 0.6 - 0.6 * math.sin(ang))
        d.polygon([_pt(b, 0.44, 0.6), _pt(b, *tip), _pt(b, 0.56, 0.6)], fill=c)
    d.polygon([_pt(b, 0.18, 0.58), _pt(b, 0.82, 0.58), _pt(b, 0.72, 1.0), _pt(b, 0.28, 1.0)], fill=(180, 90, 50))


def _clock(d: ImageDraw.ImageDraw, b: Box, c: Colour, r: np.random.Generator) -> None:
    d.ellipse(_rect(b, 0.0, 0.0, 1.0, 1.0), fill=c)
    d.ellipse(_rect(b, 0.1, 0.1, 0.9, 0.9), fill=(245, 245, 235))
    w = _lw(b, 0.06)
    ang = float(r.uniform(0, 2 * math.pi))
    d.line([_pt(b, 0.5, 0.5), _pt(b, 0.5, 0.18)], fill=(20, 20, 20), width=w)
    d.line(
        [_pt(b, 0.5, 0.5), _pt(b, 0.5 + 0.25 * math.cos(ang), 0.5 + 0.25 * math.sin(ang))], fill=(20, 20, 20), width=w
    )


def _book(d: ImageDraw.ImageDraw, b: Box, c: Colour, r: np.random.Generator) -> None:
    d.polygon([_pt(b, 0.2, 0.0), _pt(b, 1.0, 0.0), _pt(b, 0.8, 1.0), _pt(b, 0.0, 1.0)], fill=(245, 240, 225))
    d.polygon([_pt(b, 0.2, 0.0), _pt(b, 0.9, 0.0), _pt(b, 0.7, 0.9), _pt(b, 0.0, 0.9)], fill=c)
    d.line([_pt(b, 0.12, 0.0), _pt(b, -0.06, 0.9)], fill=_shade(c, 0.5), width=_lw(b, 0.1))


def _vase(d: ImageDraw.ImageDraw, b: Box, c: Colour, r: np.random.Generator) -> None:
    right = [(0.62, 0.0), (0.56, 0.1), (0.58, 0.25), (0.85, 0.45), (0.95, 0.62), (0.82, 0.85), (0.68, 1.0)]
    left = [(1.0 - u, v) for u, v in reversed(right)]
    d.polygon([_pt(b, u, v) for u, v in right + left], fill=c)
    d.rectangle(_rect(b, 0.2, 0.58, 0.8, 0.64), fill=_shade(c, 0.6))


@dataclass(frozen=True)
class Category:
    """A COCO category as drawn: its silhouette, base colour, aspect (width/height) and caption nouns."""

    name: str
    context: str
    draw: Drawer
    colour: Colour
    aspect: float
    nouns: tuple[tuple[str, str], ...]  # (singular, plural); every noun is a COCO synonym of `name`


_CATS: tuple[Category, ...] = (
    # kitchen
    Category("fork", "kitchen", _fork, (105, 110, 130), 0.45, (("fork", "forks"),)),
    Category("knife", "kitchen", _knife, (150, 150, 165), 0.35, (("knife", "knives"),)),
    Category("cup", "kitchen", _cup, (70, 130, 200), 0.9, (("cup", "cups"),)),
    Category("spoon", "kitchen", _spoon, (165, 115, 55), 0.45, (("spoon", "spoons"),)),
    Category("bowl", "kitchen", _bowl, (230, 150, 60), 1.6, (("bowl", "bowls"),)),
    Category("bottle", "kitchen", _bottle, (60, 150, 80), 0.45, (("bottle", "bottles"),)),
    Category(
        "dining table", "kitchen", _table, (140, 90, 45), 1.5, (("table", "tables"), ("dining table", "dining tables"))
    ),
    # street
    Category("car", "street", _car, (200, 40, 40), 1.6, (("car", "cars"), ("taxi", "taxis"), ("sedan", "sedans"))),
    Category(
        "traffic light",
        "street",
        _traffic_light,
        (40, 40, 45),
        0.45,
        (("traffic light", "traffic lights"), ("stop light", "stop lights")),
    ),
    Category("bus", "street", _bus, (235, 190, 40), 1.8, (("bus", "buses"),)),
    Category("stop sign", "street", _stop_sign, (210, 30, 35), 0.7, (("stop sign", "stop signs"),)),
    Category("truck", "street", _truck, (60, 90, 170), 1.6, (("truck", "trucks"), ("lorry", "lorries"))),
    Category("bicycle", "street", _bicycle, (30, 160, 170), 1.5, (("bicycle", "bicycles"), ("bike", "bikes"))),
    Category(
        "fire hydrant",
        "street",
        _hydrant,
        (220, 180, 30),
        0.65,
        (("fire hydrant", "fire hydrants"), ("hydrant", "hydrants")),
    ),
    # park
    Category("dog", "park", _dog, (150, 100, 55), 1.3, (("dog", "dogs"), ("puppy", "puppies"), ("pup", "pups"))),
    Category("frisbee", "park", _frisbee, (240, 90, 170), 1.5, (("frisbee", "frisbees"),)),
    Category(
        "person",
        "park",
        _person,
        (210, 60, 60),
        0.6,
        (
            ("man", "men"),
            ("woman", "women"),
            ("person", "people"),
            ("boy", "boys"),
            ("girl", "girls"),
            ("child", "children"),
        ),
    ),
    Category("kite", "park", _kite, (250, 140, 30), 0.75, (("kite", "kites"),)),
    Category("bench", "park", _bench, (110, 70, 40), 1.5, (("bench", "benches"),)),
    Category("bird", "park", _bird, (40, 40, 60), 1.6, (("bird", "birds"), ("pigeon", "pigeons"))),
    Category("umbrella", "park", _umbrella, (120, 60, 180), 1.1, (("umbrella", "umbrellas"),)),
    # living room
    Category("tv", "living room", _tv, (35, 35, 40), 1.3, (("tv", "tvs"), ("television", "televisions"))),
    Category("remote", "living room", _remote, (50, 50, 55), 0.4, (("remote", "remotes"),)),
    Category("couch", "living room", _couch, (90, 120, 160), 1.6, (("couch", "couches"), ("sofa", "sofas"))),
    Category(
        "potted plant",
        "living room",
        _potted_plant,
        (50, 150, 60),
        0.8,
        (("potted plant", "potted plants"), ("houseplant", "houseplants")),
    ),
    Category("clock", "living room", _clock, (120, 70, 40), 1.0, (("clock", "clocks"),)),
    Category("book", "living room", _book, (150, 40, 60), 0.8, (("book", "books"),)),
    Category("vase", "living room", _vase, (60, 160, 190), 0.65, (("vase", "vases"),)),
)
CATEGORIES: dict[str, Category] = {c.name: c for c in _CATS}
CONTEXTS: tuple[str, ...] = ("kitchen", "street", "park", "living room")
# (anchor, partner): the partner comes with its anchor PARTNER_RATE of the time in training scenes.
PAIRS: dict[str, tuple[tuple[str, str], ...]] = {
    "kitchen": (("fork", "knife"), ("cup", "spoon")),
    "street": (("car", "traffic light"), ("bus", "stop sign")),
    "park": (("dog", "frisbee"), ("person", "kite")),
    "living room": (("tv", "remote"), ("couch", "potted plant")),
}
PARTNER_OF: dict[str, str] = {a: p for pairs in PAIRS.values() for a, p in pairs}
ANCHOR_OF: dict[str, str] = {p: a for a, p in PARTNER_OF.items()}
_BACKGROUND: dict[str, Colour] = {
    "kitchen": (225, 215, 195),
    "street": (150, 150, 155),
    "park": (120, 175, 95),
    "living room": (205, 180, 150),
}
_CONTEXT_PHRASE = {
    "kitchen": "in a kitchen",
    "street": "on a street",
    "park": "in a park",
    "living room": "in a living room",
}


# ------------------------------------------------------------------------------------------ scenes
@dataclass
class Instance:
    category: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in image pixels
    small: bool = False
    occluded: bool = False


@dataclass
class Scene:
    image_id: str
    split: str
    context: str
    instances: list[Instance]
    anchors: list[str]
    absent_partners: list[str]
    caption: str = ""
    image: Image.Image | None = field(default=None, repr=False)

    @property
    def objects(self) -> list[str]:
        """Distinct COCO categories present, in drawing order."""
        return list(dict.fromkeys(i.category for i in self.instances))

    def meta(self) -> dict[str, Any]:
        return {
            "context": self.context,
            "anchors": self.anchors,
            "absent_partners": self.absent_partners,
            "hard": sorted({i.category for i in self.instances if i.small or i.occluded}),
            "instances": [
                {"category": i.category, "box": list(i.box), "small": i.small, "occluded": i.occluded}
                for i in self.instances
            ],
            "caption": self.caption,
        }


def _rng(split: str, index: int, seed: int = SEED) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), index])


def _compose(split: str, r: np.random.Generator) -> tuple[str, list[str], list[str], list[str]]:
    """Pick context and categories: (context, categories, anchors present, absent partners)."""
    context = CONTEXTS[int(r.integers(len(CONTEXTS)))]
    pairs = PAIRS[context]
    chosen: list[str] = []
    anchors: list[str] = []
    absent: list[str] = []
    broken = int(r.integers(len(pairs))) if split == "counter-prior" else -1
    force = int(r.integers(len(pairs))) if split in ("in-prior", "hard") else -1
    for k, (anchor, partner) in enumerate(pairs):
        if k == broken:
            chosen.append(anchor)
            anchors.append(anchor)
            absent.append(partner)
        elif k == force or r.random() < 0.5:
            chosen.append(anchor)
            anchors.append(anchor)
            # Held-out scenes other than the broken pair keep the prior exactly.
            if split != "train" or r.random() < PARTNER_RATE:
                chosen.append(partner)
        elif r.random() < 0.15:
            chosen.append(partner)
    target = int(r.choice([1, 2, 3, 4], p=[0.15, 0.3, 0.3, 0.25]))
    pair_members = {c for p in pairs for c in p}
    singles = [c.name for c in _CATS if c.context == context and c.name not in pair_members]
    r.shuffle(singles)
    while len(chosen) < target and singles:
        chosen.append(singles.pop())
    if split == "train" and r.random() < 0.05:
        # An out-of-context object now and then, so context alone never decides a category.
        foreign = [c.name for c in _CATS if c.context != context and c.name not in PARTNER_OF.values()]
        chosen.append(foreign[int(r.integers(len(foreign)))])
    return context, chosen, anchors, absent


def _background(r: np.random.Generator, context: str, size: int) -> Image.Image:
    base = np.array(_BACKGROUND[context], dtype=float) + r.normal(0, 10, 3)
    img = Image.new("RGB", (size, size), tuple(int(v) for v in np.clip(base, 0, 255)))
    d = ImageDraw.Draw(img)
    # Context texture (tiles, road, grass, floor) plus random low-contrast clutter.
    if context == "kitchen":
        step = int(r.integers(16, 28)) * _SS
        tone = tuple(int(v) for v in np.clip(base - 25, 0, 255))
        for x in range(int(r.integers(step)), size, step):
            d.line([(x, 0), (x, size)], fill=tone, width=_SS)
            d.line([(0, x), (size, x)], fill=tone, width=_SS)
    elif context == "street":
        y = int(r.uniform(0.55, 0.8) * size)
        d.rectangle([0, y, size, size], fill=(95, 95, 100))
        for x in range(int(r.integers(20)) * _SS, size, 24 * _SS):
            d.rectangle([x, y + 10 * _SS, x + 10 * _SS, y + 12 * _SS], fill=(230, 230, 230))
    elif context == "park":
        d.rectangle([0, 0, size, int(r.uniform(0.15, 0.35) * size)], fill=(150, 200, 235))
        for _ in range(30):
            x, y = r.uniform(0, size, 2)
            d.line([(x, y), (x + r.uniform(-3, 3) * _SS, y - 4 * _SS)], fill=(90, 145, 70), width=_SS)
    else:
        y = int(r.uniform(0.6, 0.8) * size)
        d.rectangle([0, y, size, size], fill=(150, 110, 75))
        for x in range(int(r.integers(12)) * _SS, size, 12 * _SS):
            d.line([(x, 0), (x, y)], fill=tuple(int(v) for v in np.clip(base + 12, 0, 255)), width=_SS)
    for _ in range(int(r.integers(4, 12))):
        col = tuple(int(v) for v in np.clip(base + r.normal(0, 35, 3), 0, 255))
        x, y = r.uniform(0, size, 2)
        s = r.uniform(2, 7) * _SS
        if r.random() < 0.5:
            d.line([(x, y), (x + r.uniform(-2, 2) * s, y + r.uniform(-2, 2) * s)], fill=col, width=_SS)
        else:
            d.ellipse([x, y, x + s, y + s * r.uniform(0.5, 1.5)], fill=col)
    return img


def _overlap(a: Box, b: Box) -> float:
    """Intersection area over the smaller box's area."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return w * h / smaller


def _jitter_colour(r: np.random.Generator, c: Colour) -> Colour:
    f = r.uniform(0.8, 1.2)
    return tuple(int(v) for v in np.clip(np.array(c) * f + r.normal(0, 12, 3), 0, 255))  # type: ignore[return-value]


def _place(r: np.random.Generator, cat: Category, size_px: float, placed: list[Box], max_overlap: float) -> Box:
    aspect = cat.aspect * r.uniform(0.85, 1.15)
    w, h = (size_px, size_px / aspect) if aspect >= 1 else (size_px * aspect, size_px)
    best: Box | None = None
    best_ov = 2.0
    for _ in range(30):
        x0 = r.uniform(1, IMAGE_SIZE - w - 1)
        y0 = r.uniform(1, IMAGE_SIZE - h - 1)
        box = (x0, y0, x0 + w, y0 + h)
        ov = max((_overlap(box, p) for p in placed), default=0.0)
        if ov <= max_overlap:
            return box
        if ov < best_ov:
            best, best_ov = box, ov
    assert best is not None
    return best


def make_scene(split: str, index: int, *, seed: int = SEED, render: bool = True) -> Scene:
    """Scene `index` of `split`: composition, layout, caption and (when `render`) the 96x96 image."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    r = _rng(split, index, seed)
    context, chosen, anchors, absent = _compose(split, r)
    counts = {c: 1 for c in chosen}
    if r.random() < 0.1:
        counts[chosen[int(r.integers(len(chosen)))]] = 2
    order = [c for c in chosen for _ in range(counts[c])]
    r.shuffle(order)  # drawing order decides who overlaps whom

    hard = split == "hard"
    boxes: list[Box] = []
    instances: list[Instance] = []
    occlude: list[int] = []
    for k, name in enumerate(order):
        small = hard and (r.random() < 0.5 or (k == len(order) - 1 and not occlude))
        if small:
            size_px = r.uniform(9, 14)
        elif hard:
            size_px = r.uniform(20, 32)
            occlude.append(k)
        else:
            size_px = r.uniform(16, 36)
        box = _place(r, CATEGORIES[name], size_px, boxes, 0.0 if hard else 0.25)
        boxes.append(box)
        instances.append(
            Instance(
                name,
                tuple(int(round(v)) for v in box),  # type: ignore[arg-type]
                small=small,
                occluded=k in occlude,
            )
        )
    scene = Scene(f"{split}-{index:05d}", split, context, instances, anchors, absent)
    scene.caption = make_caption(scene, r)
    if render:  # rendering draws from `r` last, so composition and caption do not depend on it
        scene.image = _render(r, scene, boxes, occlude)
    return scene


def _render(r: np.random.Generator, scene: Scene, boxes: list[Box], occlude: list[int]) -> Image.Image:
    big = IMAGE_SIZE * _SS
    img = _background(r, scene.context, big)
    d = ImageDraw.Draw(img)
    for inst, box in zip(scene.instances, boxes, strict=True):
        cat = CATEGORIES[inst.category]
        sbox = (box[0] * _SS, box[1] * _SS, box[2] * _SS, box[3] * _SS)
        cat.draw(d, sbox, _jitter_colour(r, cat.colour), r)
    base = np.array(_BACKGROUND[scene.context], dtype=float)
    for k in occlude:
        # A plain slab covering 40-55% of the object from one side: the object stays identifiable.
        x0, y0, x1, y1 = (v * _SS for v in boxes[k])
        f = r.uniform(0.4, 0.55)
        side = int(r.integers(4))
        if side == 0:
            slab = [x0 - 2, y0 - 2, x0 + f * (x1 - x0), y1 + 2]
        elif side == 1:
            slab = [x1 - f * (x1 - x0), y0 - 2, x1 + 2, y1 + 2]
        elif side == 2:
            slab = [x0 - 2, y0 - 2, x1 + 2, y0 + f * (y1 - y0)]
        else:
            slab = [x0 - 2, y1 - f * (y1 - y0), x1 + 2, y1 + 2]
        tone = tuple(int(v) for v in np.clip(base * r.uniform(0.55, 0.8), 0, 255))
        d.rectangle(slab, fill=tone)
    return img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


# ---------------------------------------------------------------------------------------- captions
_NUMBER = {2: "two"}
_OPENERS = (
    "There {be} {list}.",
    "This image shows {list}.",
    "The picture shows {list}.",
    "In this image, there {be} {list}.",
    "I can see {list}.",
    "This is a scene {ctx} with {list}.",
    "The image shows {list} {ctx}.",
    "A photo {ctx} showing {list}.",
    "Here we see {list} {ctx}.",
)
_SECOND = ("There {be} also {list}.", "We can also see {list}.", "Nearby there {be} {list}.")
_LINKS = ("and", "next to", "with", "beside", "near")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(r: np.random.Generator, name: str, count: int) -> str:
    nouns = CATEGORIES[name].nouns
    singular, plural = nouns[int(r.integers(len(nouns)))]
    return f"{_NUMBER[count]} {plural}" if count > 1 else f"{_article(singular)} {singular}"


def _join(items: Sequence[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def make_caption(scene: Scene, r: np.random.Generator) -> str:
    """A natural caption naming every object once; an anchor's partner follows the anchor directly."""
    counts: dict[str, int] = {}
    for inst in scene.instances:
        counts[inst.category] = counts.get(inst.category, 0) + 1
    names = list(counts)
    r.shuffle(names)
    units: list[str] = []
    done: set[str] = set()
    for name in names:
        if name in done:
            continue
        anchor = ANCHOR_OF.get(name)
        if anchor in counts:
            name = anchor  # a partner is always named right after its anchor
        done.add(name)
        partner = PARTNER_OF.get(name)
        if partner in counts and partner not in done:
            done.add(partner)
            link = _LINKS[int(r.integers(len(_LINKS)))]
            units.append(f"{_phrase(r, name, counts[name])} {link} {_phrase(r, partner, counts[partner])}")
        else:
            units.append(_phrase(r, name, counts[name]))
    split_at = len(units)
    if len(units) >= 3 and r.random() < 0.4:
        split_at = int(r.integers(1, len(units)))
    first, second = units[:split_at], units[split_at:]

    def fill(template: str, group: list[str]) -> str:
        plural = len(group) > 1 or group[0].startswith("two ")
        return template.format(be="are" if plural else "is", list=_join(group), ctx=_CONTEXT_PHRASE[scene.context])

    text = fill(_OPENERS[int(r.integers(len(_OPENERS)))], first)
    if second:
        text += " " + fill(_SECOND[int(r.integers(len(_SECOND)))], second)
    return text


def caption_vocabulary() -> list[str]:
    """Every word a caption can contain, split as the word-level tokenizer splits (words, punctuation)."""
    texts = ["two an a are is , ."]
    texts += [t.format(be="", list="", ctx="") for t in _OPENERS + _SECOND]
    texts += list(_CONTEXT_PHRASE.values()) + list(_LINKS)
    texts += [f"{s} {p}" for cat in _CATS for s, p in cat.nouns]
    return list(dict.fromkeys(w for t in texts for w in re.findall(r"\w+|[^\w\s]+", t)))


# ------------------------------------------------------------------------------------------ output
def write_split(split: str, out_dir: str | Path, n: int | None = None, *, seed: int = SEED) -> Path:
    """Write `n` scenes of `split` as PNGs plus `truth.json` and `meta.json`; returns the folder."""
    n = HELD_OUT_SIZES.get(split, 1000) if n is None else n
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    truth: dict[str, list[str]] = {}
    meta: dict[str, dict[str, Any]] = {}
    for i in range(n):
        scene = make_scene(split, i, seed=seed)
        assert scene.image is not None
        scene.image.save(out / f"{scene.image_id}.png")
        truth[scene.image_id] = scene.objects
        meta[scene.image_id] = scene.meta()
    (out / "truth.json").write_text(json.dumps(truth, indent=1))
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return out


def split_stats(split: str, n: int, *, seed: int = SEED) -> dict[str, float]:
    """Mean objects, anchors, absent partners, small/occluded objects per scene; P(partner | anchor)."""
    tot = {"objects": 0.0, "anchors": 0.0, "absent_partners": 0.0, "small": 0.0, "occluded": 0.0}
    with_anchor = with_partner = 0
    for i in range(n):
        s = make_scene(split, i, seed=seed, render=False)
        tot["objects"] += len(s.objects)
        tot["anchors"] += len(s.anchors)
        tot["absent_partners"] += len(s.absent_partners)
        tot["small"] += sum(x.small for x in s.instances)
        tot["occluded"] += sum(x.occluded for x in s.instances)
        for a in s.anchors:
            with_anchor += 1
            with_partner += PARTNER_OF[a] in s.objects
    stats = {k: round(v / n, 3) for k, v in tot.items()}
    stats["partner_given_anchor"] = round(with_partner / max(1, with_anchor), 3)
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a split of synthetic COCO scenes to a folder.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write PNGs, truth.json and meta.json")
    w.add_argument("split", choices=SPLITS)
    w.add_argument("--out", required=True)
    w.add_argument("-n", type=int, default=None)
    st = sub.add_parser("stats", help="print split statistics as JSON")
    st.add_argument("split", choices=SPLITS)
    st.add_argument("-n", type=int, default=None)
    args = parser.parse_args(argv)
    if args.cmd == "write":
        print(write_split(args.split, args.out, args.n))
    else:
        n = args.n or HELD_OUT_SIZES.get(args.split, 20000)
        print(json.dumps(split_stats(args.split, n)))


if __name__ == "__main__":
    main()
