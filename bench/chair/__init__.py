"""CHAIR, the object-hallucination measure: the scorer (`score.py`), captioning a labelled set through a live
server at several knob settings (`run.py`), calibrating a model's knob presets on it (`calibrate.py`), and
their command line (`cli.py`, `python -m bench.chair score|run|compare|calibrate`)."""

from bench.chair.score import (
    ChairResult,
    ImageScore,
    caption_objects,
    caption_words,
    compute_chair,
    load_captions,
    load_coco_truth,
    load_truth,
    partner_rate,
    score_caption,
    singularize,
)

__all__ = [
    "ChairResult",
    "ImageScore",
    "caption_objects",
    "caption_words",
    "compute_chair",
    "load_captions",
    "load_coco_truth",
    "load_truth",
    "partner_rate",
    "score_caption",
    "singularize",
]
