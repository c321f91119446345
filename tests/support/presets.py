"""Knob presets files (sevi/method/knob.py): a valid document to vary, and model folders that carry one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def presets_doc(**overrides: Any) -> dict[str, Any]:
    """A valid presets document (balanced at c = 0.4), with `overrides` applied."""
    doc: dict[str, Any] = {
        "format": 1,
        "balanced": 0.4,
        "focused": 1.0,
        "contrast": True,
        "knots": [
            {"c": 0.0, "omega": 0.0, "start_layer": 3, "kappa": 0.2},
            {"c": 0.4, "omega": 1.0, "start_layer": 3, "kappa": 0.2},
            {"c": 1.0, "omega": 3.0, "start_layer": 0, "kappa": 0.5, "measured": {"chair_s": 0.4}},
        ],
    }
    doc.update(overrides)
    return doc


def model_folder(tmp_path: Path, layers: int = 4, presets: dict[str, Any] | str | None = None) -> Path:
    """A model folder with just a config.json of `layers` decoder layers and, if given, a presets file."""
    from sevi.method.knob import PRESETS_FILE

    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "llava", "text_config": {"num_hidden_layers": layers}})
    )
    if presets is not None:
        text = presets if isinstance(presets, str) else json.dumps(presets)
        (tmp_path / PRESETS_FILE).write_text(text)
    return tmp_path
