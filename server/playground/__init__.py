"""The playground page: one image captioned at several conservativeness levels side by side, in the browser.

Plain HTML, CSS and JavaScript modules in `static/` (no build step), served by `server.routes.playground`
with the object vocabulary (`vocabulary.py`) the page marks differing object words with.
"""

from pathlib import Path

STATIC_DIR = Path(__file__).parent / "static"
