"""Streaming detokenization: a whole decode per token (what both engines did) vs TextStream. Prints a table.

    python -m bench.detokenize [--model DIR] [--lengths 64,256,1024] [--repeats 5]

Per generated token, the engines turn the ids so far into the new text. Decoding every id again is
O(n) per token; TextStream (sevi/engines/detokenizer.py) keeps only the window it needs. The ids are a
caption's worth of text from the model's own tokenizer, repeated to length; microseconds per token,
best of --repeats, both measured in the same run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from sevi.engines.detokenizer import TextStream

TEXT = (
    "a red cat sits on a mat next to a blue bowl . a dog sleeps under the table , and a kite hangs above the window . "
)


def whole_decodes(tokenizer: Any, ids: list[int]) -> str:
    text = ""
    for i in range(1, len(ids) + 1):
        full = tokenizer.decode(ids[:i], skip_special_tokens=True)
        if not full.endswith("\ufffd"):
            text = full
    return text


def streamed(tokenizer: Any, ids: list[int]) -> str:
    stream = TextStream(tokenizer)
    for t in ids:
        stream.append(t)
    return stream.text


def best_us_per_token(run: Any, tokenizer: Any, ids: list[int], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(tokenizer, ids)
        times.append(time.perf_counter() - t0)
    return 1e6 * min(times) / len(ids)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path(__file__).resolve().parents[1] / "models" / "bundled")
    parser.add_argument("--lengths", default="64,256,1024")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    unit = tokenizer.encode(TEXT, add_special_tokens=False)
    print(f"tokenizer: {args.model}  (us per token, best of {args.repeats})")
    print(f"  {'tokens':>6}  {'whole decode':>12}  {'TextStream':>10}  {'speed-up':>8}")
    for n in (int(x) for x in args.lengths.split(",")):
        ids = (unit * (n // len(unit) + 1))[:n]
        assert streamed(tokenizer, ids) == whole_decodes(tokenizer, ids)
        old = best_us_per_token(whole_decodes, tokenizer, ids, args.repeats)
        new = best_us_per_token(streamed, tokenizer, ids, args.repeats)
        print(f"  {n:>6}  {old:>12.1f}  {new:>10.1f}  {old / new:>7.1f}x")


if __name__ == "__main__":
    main()
