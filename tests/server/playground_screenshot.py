"""Regenerate the README's screenshot of the playground: the bundled model, one sample scene, three levels.

    .venv/bin/python -m tests.server.playground_screenshot [--out docs/playground.png] [--sample "Living room"]

It serves `models/bundled` with the reference engine in this process (the vLLM engine gives the same greedy
tokens), drives the page in the system Chromium as the browser tests do, and writes a palette PNG (small
enough to keep in the repository).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

from tests.server.browser import (
    REPO,
    choose_sample,
    chromium,
    comparison,
    find_chromium,
    open_playground,
    screenshot,
)
from tests.support.live_server import LiveServer, base_settings


def take(out: Path, sample: str, width: int) -> Path:
    executable = find_chromium()
    if executable is None:
        raise SystemExit("no Chromium found: apt-get install chromium (or set SEVI_CHROMIUM)")
    torch.set_num_threads(1)
    live = LiveServer(base_settings(REPO / "models" / "bundled", default_max_tokens=64)).start()
    try:
        with chromium(executable) as browser:
            page = browser.new_page(viewport={"width": width, "height": 800})
            open_playground(page, live.url)
            choose_sample(page, sample)
            with comparison(page, 3):
                page.get_by_role("button", name="Compare").click()
            page.locator("#run").blur()
            screenshot(page, out)
    finally:
        live.stop()
    # 256 colours lose nothing visible on a page of flat colours and make the file a third of the size.
    Image.open(out).convert("RGB").quantize(256).save(out, optimize=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.server.playground_screenshot", description=__doc__)
    p.add_argument("--out", type=Path, default=REPO / "docs" / "playground.png")
    p.add_argument("--sample", default="Living room", help="label of the sample scene to caption")
    p.add_argument("--width", type=int, default=1200, help="viewport width in CSS pixels")
    args = p.parse_args(argv)
    print(take(args.out, args.sample, args.width))


if __name__ == "__main__":
    main()
