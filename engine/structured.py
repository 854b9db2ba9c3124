"""Constrained decoding: a request's StructuredSpec -> a grammar matcher that masks its tokens.

The library is llguidance (docs/serving.md says why): it turns a JSON schema, regex, choice list or Lark
grammar into a matcher over the tokenizer's vocabulary, computes the bitmask of the tokens allowed next
and advances by each accepted token. Its work is bounded by its parser limits (`LIMITS`): a grammar too
large or too ambiguous puts the matcher in an error state instead of running away, and every mask step
has a fuel budget.

Compiling happens off the engine's step loop: `GrammarCompiler.submit` runs it on a small thread pool
and caches the result (a pristine matcher, copied for each request) under a hash of the spec and the
tokenizer; AsyncLLMEngine awaits it, with a time limit, before the request reaches the loop, where
`matcher()` then finds it in the cache. A spec that cannot compile raises GrammarError (a ValueError
naming `structured`): it fails that request alone.

Per step the sampler asks `MaskFiller.fill` for the rows that have a grammar (host, in llguidance's own
threads) and `apply_bitmask` sets the logits of every token the grammar forbids to -inf on the device,
after the forward (CUDA graphs are unaffected), before sampling.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor

from engine.sampling_params import SamplingParamsError, StructuredSpec

# JSON is written compactly (no free whitespace): a model cannot loop on blanks, and the text is shorter.
JSON_OPTIONS: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHE_SIZE = 256
COMPILE_THREADS = 2
COMPILE_TIMEOUT_S = 10.0


def _limits() -> Any:
    import llguidance

    # llguidance's defaults, stated (and so kept when its defaults change): each bounds a cost a client's
    # grammar controls, so a hostile one errors out instead of stalling a compile or a step.
    return llguidance.LLParserLimits(
        max_items_in_row=2000,
        initial_lexer_fuel=1_000_000,
        step_lexer_fuel=200_000,
        step_max_items=50_000,
        max_lexer_states=250_000,
        max_grammar_size=500_000,
    )


class GrammarError(SamplingParamsError):
    """The spec does not compile (bad schema, regex or grammar; too large; too slow)."""

    def __init__(self, message: str) -> None:
        super().__init__("structured", message)


def grammar_text(spec: StructuredSpec) -> str:
    """The spec in llguidance's grammar format."""
    from llguidance import LLMatcher

    if spec.kind == "json":
        return LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=JSON_OPTIONS)
    if spec.kind == "json_schema":
        return LLMatcher.grammar_from_json_schema(str(spec.value), defaults=JSON_OPTIONS)
    if spec.kind == "regex":
        return LLMatcher.grammar_from_regex(str(spec.value))
    if spec.kind == "choice":
        # A Lark rule of quoted literals: the output is exactly one of them.
        alternatives = " | ".join(json.dumps(c) for c in spec.value or ())
        return LLMatcher.grammar_from_lark(f"start: {alternatives}")
    return LLMatcher.grammar_from_lark(str(spec.value))


class GrammarState:
    """One sequence's matcher: the tokens it allows next, advanced by each token the sequence takes."""

    __slots__ = ("matcher",)

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher

    def accept(self, token_id: int) -> bool:
        """Advance by `token_id`; False when the grammar does not allow it (the matcher is then in error)."""
        return bool(self.matcher.consume_token(token_id))

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing but the end of the sequence may follow."""
        return bool(self.matcher.is_stopped())

    @property
    def error(self) -> str:
        return str(self.matcher.get_error()) if self.matcher.is_error() else ""


class GrammarCompiler:
    """Specs -> matchers for one tokenizer, compiled on worker threads and cached by their hash."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        cache_size: int = CACHE_SIZE,
        threads: int = COMPILE_THREADS,
        timeout_s: float = COMPILE_TIMEOUT_S,
    ) -> None:
        """tokenizer: a Hugging Face fast tokenizer; vocab_size: the width of the model's logits (ids past
        the tokenizer's own are never allowed)."""
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="grammar")
        self._lock = threading.Lock()  # the cache's; never held while compiling
        self._tokenizer_lock = threading.Lock()
        self._cache: OrderedDict[str, Future[Any]] = OrderedDict()
        self._ll_tokenizer: Any = None
        self._tokenizer_id = ""

    def key(self, spec: StructuredSpec) -> str:
        """The cache key: the spec and the tokenizer it was compiled for."""
        if not self._tokenizer_id:
            tok = self.tokenizer
            name = f"{getattr(tok, 'name_or_path', '')}|{len(tok)}|{self.vocab_size}"
            self._tokenizer_id = hashlib.sha256(name.encode()).hexdigest()[:16]
        return hashlib.sha256(f"{self._tokenizer_id}|{spec.key()}".encode()).hexdigest()

    def submit(self, spec: StructuredSpec) -> Future[Any]:
        """The compiled grammar, from the cache or compiling on a worker thread. A failure is cached too:
        the same bad schema is answered at once the next time."""
        key = self.key(spec)
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            future = self._pool.submit(self._compile, spec)
            self._cache[key] = future
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return future

    def compile(self, spec: StructuredSpec, timeout_s: float | None = None) -> Any:
        """Wait for `spec`'s compiled grammar (GrammarError when it fails or takes over the time limit)."""
        limit = self.timeout_s if timeout_s is None else timeout_s
        try:
            return self.submit(spec).result(timeout=limit)
        except TimeoutError:
            raise GrammarError(
                f"the {spec.kind} took longer than {limit:g}s to compile; simplify it"
            ) from None
        except GrammarError:
            raise
        except Exception as exc:  # the library refused it some other way: still this request's fault
            raise GrammarError(f"invalid {spec.kind}: {_short(str(exc))}") from None

    def matcher(self, spec: StructuredSpec) -> GrammarState:
        """A fresh matcher for one sequence (a copy of the cached, never advanced one)."""
        return GrammarState(self.compile(spec).deep_copy())

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- on the worker threads ----
    def ll_tokenizer(self) -> Any:
        with self._tokenizer_lock:
            if self._ll_tokenizer is None:
                import llguidance.hf

                # About a second for a 128k vocabulary: once per engine, on a worker thread.
                self._ll_tokenizer = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size)
            return self._ll_tokenizer

    def _compile(self, spec: StructuredSpec) -> Any:
        import llguidance

        try:
            text = grammar_text(spec)
        except (ValueError, RuntimeError, TypeError) as exc:
            raise GrammarError(f"invalid {spec.kind}: {exc}") from None
        matcher = llguidance.LLMatcher(self.ll_tokenizer(), text, log_level=0, limits=_limits())
        if not matcher.is_error():
            # Compute the first mask now: llguidance builds its lexer lazily, and a grammar too large for
            # the limits shows it here, on this thread, rather than in a step.
            mask = torch.empty(bitmask_width(self.vocab_size), dtype=torch.int32)
            matcher.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)
        if matcher.is_error():
            raise GrammarError(f"invalid {spec.kind}: {_short(matcher.get_error())}")
        return matcher


def _short(message: str, limit: int = 500) -> str:
    message = " ".join(str(message).split())
    return message if len(message) <= limit else message[: limit - 3] + "..."


def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


class MaskFiller:
    """Fills the bitmasks of a step's constrained rows: [rows, ceil(V / 32)] int32, bit j of word w set when
    token 32 * w + j is allowed. llguidance's executor fills the rows at once on its own threads, without
    the GIL, into a host buffer, which is then copied to the device. The host buffers are pinned (the copy
    does not wait for the step) and reused, two in turn, each written again only once its last copy has
    finished: pinning memory anew each step cost milliseconds a step on a GPU machine."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        import llguidance

        self.width = bitmask_width(vocab_size)
        self.device = device
        self.executor = llguidance.LLExecutor()
        self._buffers: list[Tensor | None] = [None, None]
        self._copies: list[Any] = [None, None]  # CUDA event of each buffer's last copy
        self._turn = 0

    def fill(self, states: list[GrammarState]) -> Tensor:
        """The masks of `states`, on the device (on the CPU: a view of a reused buffer)."""
        import llguidance.torch

        turn = self._turn = 1 - self._turn
        if self._copies[turn] is not None:
            self._copies[turn].synchronize()
        buffer = self._buffers[turn]
        if buffer is None or buffer.shape[0] < len(states):
            rows = max(64, 1 << (len(states) - 1).bit_length())
            pin = self.device.type == "cuda"
            buffer = self._buffers[turn] = torch.empty((rows, self.width), dtype=torch.int32, pin_memory=pin)
        mask = buffer[: len(states)]
        llguidance.torch.fill_next_token_bitmask_par(
            self.executor, [(s.matcher, i) for i, s in enumerate(states)], mask
        )
        if self.device.type != "cuda":
            return mask
        words = mask.to(self.device, non_blocking=True)
        self._copies[turn] = torch.cuda.Event()
        self._copies[turn].record()
        return words


_BITS: dict[torch.device, Tensor] = {}


def apply_bitmask(logits: Tensor, rows: list[int], words: Tensor) -> None:
    """Set to -inf, in place, the logits of `rows` whose token the row's mask forbids. logits [B, V] and
    words [len(rows), ceil(V / 32)] int32 (MaskFiller.fill) on the same device."""
    device = logits.device
    vocab = logits.shape[1]
    bits = _BITS.get(device)
    if bits is None:
        bits = _BITS[device] = torch.arange(32, dtype=torch.int32, device=device)
    forbidden = ((words.unsqueeze(-1) >> bits) & 1).flatten(1)[:, :vocab] == 0  # [R, V]
    if len(rows) == logits.shape[0]:  # every row constrained: no gather
        logits.masked_fill_(forbidden, float("-inf"))
        return
    index = torch.tensor(rows, dtype=torch.int64, pin_memory=device.type == "cuda").to(
        device, non_blocking=True
    )
    logits.index_copy_(0, index, logits.index_select(0, index).masked_fill_(forbidden, float("-inf")))
