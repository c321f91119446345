"""A model folder's knob presets through a live server: what /v1/models reports and what requests apply."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sevi.method.knob import PRESETS_FILE, resolve_alignment
from tests.support.images import png_bytes
from tests.support.live_server import LiveServer, base_settings

pytestmark = pytest.mark.integration

PRESETS = {
    "format": 1,
    "balanced": 0.4,
    "focused": 1.0,
    "contrast": False,
    "knots": [
        {"c": 0.0, "omega": 0.0, "start_layer": 3, "kappa": 0.3},
        {"c": 0.4, "omega": 1.5, "start_layer": 3, "kappa": 0.3},
        {"c": 1.0, "omega": 6.0, "start_layer": 1, "kappa": 0.6},
    ],
}


@pytest.fixture(scope="module")
def presets_server(llava_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    folder = tmp_path_factory.mktemp("presets-model") / "model"
    shutil.copytree(llava_dir, folder)
    (folder / PRESETS_FILE).write_text(json.dumps(PRESETS))
    live = LiveServer(base_settings(folder, default_conservativeness=0.7)).start()
    yield live
    live.stop()


def _caption(server: LiveServer, **fields: str) -> dict[str, Any]:
    with server.client() as c:
        r = c.post(
            "/caption", files={"image": ("a.png", png_bytes(5), "image/png")}, data={"max_tokens": "3", **fields}
        )
    assert r.status_code == 200, r.text
    alignment: dict[str, Any] = r.json()["alignment"]
    return alignment


def test_models_reports_the_folder_s_presets(presets_server: LiveServer) -> None:
    with presets_server.client() as c:
        card = c.get("/v1/models").json()["data"][0]["conservativeness"]
    assert card["source"].endswith(PRESETS_FILE) and card["contrast"] is False
    assert card["knots"] == PRESETS["knots"]
    assert card["presets"]["balanced"] == {"conservativeness": 0.4, "omega": 1.5, "start_layer": 3, "kappa": 0.3}
    assert card["presets"]["focused"] == {"conservativeness": 1.0, "omega": 6.0, "start_layer": 1, "kappa": 0.6}
    assert card["presets"]["off"]["omega"] == 0


def test_requests_apply_the_folder_s_presets(presets_server: LiveServer) -> None:
    assert _caption(presets_server, conservativeness="focused") == {
        "conservativeness": 1.0,
        "omega": 6.0,
        "start_layer": 1,
        "kappa": 0.6,
        "contrast": False,
    }
    assert _caption(presets_server, conservativeness="balanced")["omega"] == 1.5
    # Between knots: linear (0.7 is half way from 0.4 to 1); the server's default knob goes through the file too.
    middle = {"conservativeness": 0.7, "omega": 3.75, "start_layer": 2, "kappa": 0.45, "contrast": False}
    assert _caption(presets_server, conservativeness="0.7") == pytest.approx(middle)
    assert _caption(presets_server) == pytest.approx(middle)
    # A request's explicit values still win; c = 0 is still the unmodified model.
    assert _caption(presets_server, conservativeness="1", omega="0.5", contrast="true")["omega"] == 0.5
    assert _caption(presets_server, conservativeness="off")["omega"] == 0


def test_without_a_file_the_paper_map_is_reported_and_applied(server: LiveServer) -> None:
    with server.client() as c:
        card = c.get("/v1/models").json()["data"][0]["conservativeness"]
    assert card["source"].startswith("default") and card["knots"] is None and card["contrast"] is True
    focused = resolve_alignment("focused", 4)
    assert card["presets"]["focused"] == {
        "conservativeness": 1.0,
        "omega": focused.omega,
        "start_layer": focused.start_layer,
        "kappa": focused.kappa,
    }
    assert _caption(server, conservativeness="focused") == focused.to_dict()
