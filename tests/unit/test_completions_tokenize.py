"""Tokenizing off the event loop: worker threads, a bounded number of them, and far-too-long prompts
refused after tokenizing only their beginning. Runs the demo model's real tokenizer."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from app.domain.completions.params import RequestError
from app.domain.completions.tokenize import PREFIX_CHARS_PER_TOKEN, Tokenizer


class TokenizerSide:
    """The part of EngineClient that Tokenizer uses, over a real tokenizer; records what it was given."""

    def __init__(self, folder: Path, max_model_len: int) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.max_model_len = max_model_len
        self.lengths: list[int] = []
        self.threads: set[int] = set()
        self.running = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        with self._lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            self.lengths.append(len(text))
            self.threads.add(threading.get_ident())
            return list(self.tokenizer.encode(text))
        finally:
            with self._lock:
                self.running -= 1

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        self.threads.add(threading.get_ident())
        ids = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.demo import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("tok") / "demo")


def test_tokenizing_runs_in_worker_threads_a_bounded_number_at_once(demo_folder: Path) -> None:
    side = TokenizerSide(demo_folder, max_model_len=100_000)
    tok = Tokenizer(side, threads=2)  # type: ignore[arg-type]

    async def main() -> list[list[int]]:
        return await asyncio.gather(*(tok.encode("hello world, " * 2000) for _ in range(12)))

    results = asyncio.run(main())
    assert len({len(r) for r in results}) == 1 and len(results[0]) > 1000
    assert threading.get_ident() not in side.threads
    assert 1 <= side.most_at_once <= 2


def test_a_far_too_long_prompt_is_refused_from_its_beginning(demo_folder: Path) -> None:
    side = TokenizerSide(demo_folder, max_model_len=128)
    tok = Tokenizer(side)  # type: ignore[arg-type]
    text = "hello world, " * 50_000
    with pytest.raises(RequestError) as err:
        asyncio.run(tok.encode(text))
    assert err.value.status == 400 and err.value.code == "context_length_exceeded"
    assert err.value.param == "prompt"
    assert side.lengths == [128 * PREFIX_CHARS_PER_TOKEN]  # the rest was never tokenized


def test_a_text_within_the_prefix_length_is_tokenized_once_in_full(demo_folder: Path) -> None:
    side = TokenizerSide(demo_folder, max_model_len=128)
    tok = Tokenizer(side)  # type: ignore[arg-type]
    text = ("hello world, " * 1000)[: 128 * PREFIX_CHARS_PER_TOKEN]
    assert asyncio.run(tok.encode(text)) == list(side.tokenizer.encode(text))
    assert side.lengths == [len(text)]  # no separate pass over its beginning


def test_chat_messages_are_checked_by_their_contents(demo_folder: Path) -> None:
    side = TokenizerSide(demo_folder, max_model_len=64)
    tok = Tokenizer(side)  # type: ignore[arg-type]
    messages: list[dict[str, Any]] = [{"role": "user", "content": "hello world, " * 5000}]
    with pytest.raises(RequestError) as err:
        asyncio.run(tok.apply_chat_template(messages))
    assert err.value.param == "messages" and err.value.code == "context_length_exceeded"
    short = [{"role": "user", "content": "hi"}]
    assert asyncio.run(tok.apply_chat_template(short))
    assert threading.get_ident() not in side.threads
