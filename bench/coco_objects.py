"""The COCO object vocabulary of the CHAIR metric, re-exported for the scorer.

The word lists live in `sevi.evaluation.coco_objects`, on the runtime side, because the server's playground page
serves them too and server/ does not import bench/.
"""

from __future__ import annotations

from sevi.evaluation.coco_objects import (
    ANIMAL_WORDS,
    CATEGORIES,
    COCO_DOUBLE_WORDS,
    DOUBLE_WORD_MAP,
    SYNONYMS,
    VEHICLE_WORDS,
    WORD_TO_CATEGORY,
    category_of,
)

__all__ = [
    "ANIMAL_WORDS",
    "CATEGORIES",
    "COCO_DOUBLE_WORDS",
    "DOUBLE_WORD_MAP",
    "SYNONYMS",
    "VEHICLE_WORDS",
    "WORD_TO_CATEGORY",
    "category_of",
]
