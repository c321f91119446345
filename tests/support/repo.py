"""Where the repository and the bundled model are, for tests that run commands or read files of the tree."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUNDLED = REPO / "models" / "bundled"
