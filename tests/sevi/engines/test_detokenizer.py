"""TextStream: token-at-a-time text equals a whole decode, for the tokenizer kinds the served models use."""

from __future__ import annotations

import random
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from sevi.engines.detokenizer import TextStream
from sevi.testing.tiny import make_word_tokenizer
from tests.support.repo import REPO

CORPUS = [
    "A café in Zürich sells crème brûlée.",
    "日本語のテキストも少し。",
    "Emoji: 🙂🚀 and naïve façades!",
    "The quick brown fox jumps over the lazy dog; 3.14 is pi.",
] * 4


def byte_level_bpe() -> PreTrainedTokenizerFast:
    """A GPT-2 / Qwen style byte-level BPE, trained on CORPUS (small vocabulary: multi-byte characters
    are split across tokens)."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>")


def metaspace_bpe() -> PreTrainedTokenizerFast:
    """A sentencepiece-style (Llama) tokenizer: word starts carry "▁", byte fallback for the rest."""
    core = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    core.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"] + byte_tokens)
    )
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def word_level() -> PreTrainedTokenizerFast:
    return make_word_tokenizer(
        ["a", "cat", "on", "mat", ".", ",", "red", "##s"], ["<pad>", "<unk>", "<eos>"], bos=None, eos="<eos>"
    )


TOKENIZERS = {
    "byte-level": byte_level_bpe,
    "metaspace": metaspace_bpe,
    "word-level": word_level,
    "bundled": lambda: AutoTokenizer.from_pretrained(REPO / "models" / "bundled"),
}


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerFast:
    return TOKENIZERS[request.param]()


def sequences(tok: PreTrainedTokenizerFast) -> list[list[int]]:
    text_ids = [tok.encode(t, add_special_tokens=False) for t in CORPUS[:4]]
    rng = random.Random(0)
    specials = list(tok.all_special_ids)
    # Encoded text, and random ids with special tokens mixed in (skipped by the decode, as by the stream).
    return text_ids + [[rng.randrange(len(tok)) for _ in range(40)] + specials for _ in range(3)]


def test_streamed_text_equals_a_whole_decode_at_every_token(tokenizer: PreTrainedTokenizerFast) -> None:
    streamed = 0
    for ids in sequences(tokenizer):
        stream = TextStream(tokenizer)
        pieces = []
        for i, token in enumerate(ids):
            piece, finish = stream.append(token)
            pieces.append(piece)
            assert finish is None
            whole = tokenizer.decode(ids[: i + 1], skip_special_tokens=True)
            if "\ufffd" not in whole:  # a whole decode of a cut character shows U+FFFD; the stream waits
                assert stream.text == whole, (ids[: i + 1], stream.text, whole)
        whole = tokenizer.decode(ids, skip_special_tokens=True)
        assert "".join(pieces) == stream.text
        # Random bytes may end inside a character: the stream holds it back, a whole decode shows U+FFFD.
        assert stream.text == whole if not whole.endswith("\ufffd") else whole.startswith(stream.text)
        streamed += stream._stream is not None
    assert streamed > 0, "never took the DecodeStream path"


def test_stop_string_across_tokens_cuts_before_it_and_max_tokens_ends() -> None:
    tok = word_level()
    ids = tok.encode("a red cat on a mat .", add_special_tokens=False)
    stream = TextStream(tok, stop=["cat on"], max_tokens=100)
    out = []
    for t in ids:  # as the engines do: until a finish reason
        out.append(stream.append(t))
        if out[-1][1] is not None:
            break
    assert len(out) == 4 and out[-1][1] == "stop"  # "on" completes the stop string
    # "cat" was held back (the stop string might start there), so what was streamed is the final text.
    assert "".join(p for p, _ in out) == stream.text == "a red "
    held = TextStream(tok, stop=["cat on"])  # the last 5 characters wait
    pieces = [held.append(t)[0] for t in tok.encode("a red cat", add_special_tokens=False)]
    assert pieces == ["", "", "a re"] and held.flush() == "d cat" and held.flush() == ""  # the end came by EOS
    capped = TextStream(tok, max_tokens=2)
    assert [capped.append(t)[1] for t in ids[:2]] == [None, "length"]


def test_include_stop_and_min_tokens_follow_vllm() -> None:
    """vLLM's include_stop_str_in_output keeps the stop string; min_tokens ignores a stop string that starts within
    the text of the first min_tokens tokens."""
    tok = word_level()
    ids = tok.encode("a cat on a cat on a mat .", add_special_tokens=False)

    def run(**kwargs: object) -> tuple[str, int]:
        stream = TextStream(tok, stop=["cat on"], max_tokens=100, **kwargs)  # type: ignore[arg-type]
        for n, t in enumerate(ids, 1):
            if stream.append(t)[1] is not None:
                return stream.text, n
        return stream.text, len(ids)

    assert run() == ("a ", 3)
    assert run(include_stop=True) == ("a cat on", 3)
    assert run(min_tokens=2) == ("a cat on a ", 6)  # the first "cat on" starts within the first 2 tokens' text
    assert run(min_tokens=1) == ("a ", 3)


def test_tokenizers_with_transformers_cleanup_take_whole_decodes() -> None:
    tok = word_level()
    tok.clean_up_tokenization_spaces = True
    stream = TextStream(tok)
    ids = tok.encode("a cat , on a mat .", add_special_tokens=False)
    for t in ids:
        stream.append(t)
    assert stream._stream is None and stream.text == tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("make", [byte_level_bpe, word_level])
def test_an_id_the_tokenizer_does_not_know_adds_what_a_whole_decode_adds(make: Any) -> None:
    tok = make()
    ids = tok.encode("a cat", add_special_tokens=False) + [len(tok) + 50]  # models often have more output ids
    ids += tok.encode("on a mat", add_special_tokens=False)  # than their tokenizer has tokens
    stream = TextStream(tok)
    for t in ids:
        stream.append(t)
    assert stream.text == tok.decode(ids, skip_special_tokens=True)
