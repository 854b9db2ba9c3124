"""Incremental detokenizer: never a split multi-byte character in a delta, stop strings across tokens."""

from __future__ import annotations

import pytest

from engine.demo import write_tokenizer
from engine.detokenizer import IncrementalDetokenizer
from engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tok")
    write_tokenizer(folder)
    return AutoTokenizer.from_pretrained(str(folder))


CORPUS = [
    "Hello world, how are you today? The weather in the city is calm and the sea is blue.",
    "A journey of a thousand miles begins with a single step. Café, naïve, résumé, déjà vu.",
    "Servers stream tokens back to clients as soon as they are ready, one word at a time.",
]


@pytest.fixture(scope="module")
def sentencepiece_tokenizer():
    """A Llama-2 / Mistral style tokenizer: metaspace words, byte-fallback tokens <0xNN> for what the
    vocabulary lacks, and a decoder that fuses the bytes and strips one leading space."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    norm = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = norm
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    trained.train_from_iterator(CORPUS * 4, trainer=trainer)
    model = json.loads(trained.to_str())["model"]
    vocab = dict(model["vocab"])
    for i in range(256):
        vocab.setdefault(f"<0x{i:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = norm
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def stream(
    tok, text: str, params: SamplingParams, prompt: str = "Hi"
) -> tuple[list[str], str | None, object]:
    ids = tok.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tok, tok.encode(prompt), params)
    deltas = []
    stopped = None
    for i, t in enumerate(ids):
        stopped = d.add_token(t)
        deltas.append(d.take_delta(finished=stopped is not None or i == len(ids) - 1))
        if stopped:
            break
    return deltas, stopped, d


def test_multibyte_characters_split_over_tokens_never_leak_replacement_chars(tokenizer):
    text = "naïve 😀 café 🚀🚀 日本語 déjà vu"
    ids = tokenizer.encode(text, add_special_tokens=False)
    # The tiny byte-level BPE really splits these characters into several tokens.
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)
    deltas, stopped, d = stream(tokenizer, text, SamplingParams())
    assert stopped is None
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == text == d.text
    assert "" in deltas  # some tokens completed no character and were held back


def test_spaces_between_words_survive_incremental_decoding(tokenizer):
    text = "The quick brown fox jumps over the lazy dog."
    deltas, _, _ = stream(tokenizer, text, SamplingParams())
    assert "".join(deltas) == text


def test_stop_string_spanning_token_boundaries_cuts_the_text(tokenizer):
    text = "Hello, world! How are you today?"
    ids = tokenizer.encode(text, add_special_tokens=False)
    stop = "ld! Ho"
    # The stop string is not one token: it starts inside one token and ends inside a later one.
    pieces = [tokenizer.decode([t]) for t in ids]
    assert stop not in pieces and all(stop not in p for p in pieces)
    deltas, stopped, d = stream(tokenizer, text, SamplingParams(stop=["zzz", stop]))
    assert stopped == stop
    assert d.text == "Hello, wor"
    assert "".join(deltas) == "Hello, wor"
    # Deltas only ever append, so no prefix of the stop string ("l", "ld", ...) was streamed first.


def test_streamed_text_holds_back_a_possible_stop_prefix(tokenizer):
    text = "one, two, three, four"
    ids = tokenizer.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tokenizer, [1], SamplingParams(stop=[", fi"]))
    streamed = ""
    for t in ids:
        assert d.add_token(t) is None
        streamed += d.take_delta(finished=False)
        # The last 3 characters (len(stop) - 1) are always held while streaming.
        assert streamed == d.text[: max(0, len(d.text) - 3)]
    streamed += d.take_delta(finished=True)
    assert streamed == text


def test_include_stop_str_in_output_and_earliest_match_wins(tokenizer):
    text = "one, two, three, four"
    _, stopped, d = stream(
        tokenizer, text, SamplingParams(stop=["three", "two"], include_stop_str_in_output=True)
    )
    assert stopped == "two" and d.text == "one, two"


def test_stop_string_in_the_first_token_and_special_tokens_skipped(tokenizer):
    eos = tokenizer.eos_token_id
    d = IncrementalDetokenizer(tokenizer, [1, 2], SamplingParams())
    for t in [*tokenizer.encode("Hello", add_special_tokens=False), eos]:
        d.add_token(t)
    assert d.text == "Hello"
    d2 = IncrementalDetokenizer(tokenizer, [1, 2], SamplingParams(skip_special_tokens=False))
    for t in [*tokenizer.encode("Hello", add_special_tokens=False), eos]:
        d2.add_token(t)
    assert d2.text == "Hello" + tokenizer.eos_token
    d3 = IncrementalDetokenizer(tokenizer, [1], SamplingParams(stop=["He"]))
    assert d3.add_token(tokenizer.encode("Hello", add_special_tokens=False)[0]) == "He"
    assert d3.text == "" and d3.take_delta(finished=True) == ""


def test_sentencepiece_byte_fallback_and_word_spaces(sentencepiece_tokenizer):
    tok = sentencepiece_tokenizer
    text = "Hello world, naïve 😀 café 日本 the sea"
    ids = tok.encode(text, add_special_tokens=False)
    assert "<0xF0>" in tok.convert_ids_to_tokens(ids)  # the emoji really is four byte tokens
    deltas, stopped, d = stream(tok, text, SamplingParams(), prompt="Hi there")
    assert stopped is None and all("\ufffd" not in x for x in deltas)
    # After a prompt, the first word keeps its space, as in decoding prompt and output together.
    assert "".join(deltas) == " " + text == d.text
    assert "😀" in deltas and "日" in deltas


class _ShoutingTokenizer:
    """Stands for a tokenizer class with its own decode: the fast path must not bypass it."""

    def __init__(self, inner):
        self.inner = inner

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens).upper()


@pytest.mark.parametrize("which", ["tokenizer", "sentencepiece_tokenizer"])
def test_fast_decode_is_the_tokenizers_decode(which, request):
    import random

    from engine.detokenizer import _plain_backend, make_decode

    tok = request.getfixturevalue(which)
    assert _plain_backend(tok) is tok.backend_tokenizer  # the fast path is really taken
    rng = random.Random(0)
    vocab = len(tok)
    special = list(tok.all_special_ids)
    for skip in (True, False):
        decode = make_decode(tok, skip)
        for _ in range(300):
            ids = [rng.randrange(vocab) for _ in range(rng.randrange(0, 8))]
            if rng.random() < 0.3:
                ids.insert(rng.randrange(len(ids) + 1), rng.choice(special))
            want = tok.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
            assert decode(ids) == want, ids


def test_a_tokenizer_with_its_own_decode_is_called_as_is(tokenizer):
    from engine.detokenizer import make_decode

    shouting = _ShoutingTokenizer(tokenizer)
    ids = tokenizer.encode("Hello world", add_special_tokens=False)
    assert make_decode(shouting, True)(ids) == "HELLO WORLD"
    d = IncrementalDetokenizer(shouting, [1], SamplingParams(stop=["WOR"]))
    stops = [d.add_token(t) for t in ids[:5]]
    assert stops[-1] == "WOR" and d.text == "HELLO "


@pytest.mark.parametrize("which", ["tokenizer", "sentencepiece_tokenizer"])
def test_streams_are_the_same_through_the_fast_and_the_long_decode(which, request, monkeypatch):
    tok = request.getfixturevalue(which)
    texts = [*CORPUS, "naïve 😀 café 日本 the sea", "déjà vu, one, two, three"]
    cases = [
        SamplingParams(),
        SamplingParams(stop=["sea", "e t", "ré"], include_stop_str_in_output=True),
        SamplingParams(stop=["in the"], skip_special_tokens=False),
    ]
    fast = [stream(tok, t, p) for t in texts for p in cases]
    monkeypatch.setattr("engine.detokenizer._plain_backend", lambda tokenizer: None)
    slow = [stream(tok, t, p) for t in texts for p in cases]
    assert any(stopped for _, stopped, _ in fast)  # stop strings really ended some streams
    assert [(deltas, stopped, d.text) for deltas, stopped, d in fast] == [
        (deltas, stopped, d.text) for deltas, stopped, d in slow
    ]
