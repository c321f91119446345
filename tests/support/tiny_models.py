"""The sizes of the tiny random models (sevi/testing/tiny.py builds them; tests/conftest.py's fixtures build them
once)."""

from __future__ import annotations

# GQA everywhere (8 query heads over 4 KV heads for LLaVA; Qwen2-VL 4 over 2), head_dim 32.
TINY_KWARGS = {
    "llava": {"layers": 4, "heads": 8, "kv_heads": 4},
    "llava_next": {"layers": 4, "heads": 8, "kv_heads": 4},
    "qwen2_vl": {"layers": 4, "heads": 4, "kv_heads": 2},
    "qwen2_5_vl": {"layers": 4, "heads": 4, "kv_heads": 2},
}
