"""Turning a validated OpenAI request into a CompletionRun: resolve `model`, tokenize, fit the context.

Everything here happens before the limiter and before a usage row, so a refusal costs the tenant nothing
and never reaches the engine.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from app.domain.completions import params
from app.domain.completions.adapter_files import AdapterFiles
from app.domain.completions.run import Caller, CompletionRun, Target
from app.domain.completions.schemas import ChatCompletionRequest, CompletionRequest
from app.domain.completions.tokenize import Tokenizer
from app.engine_client import EngineClient

log = logging.getLogger(__name__)

# resolve(tenant_id, model_name) -> the tenant's adapter row (name or name@N), or None.
Resolver = Callable[[str, str], Awaitable[Any]]


def cache_salt(secret: str, tenant_id: str) -> str:
    """The prefix-cache salt: only the server can make it, so no client can aim at another's blocks."""
    return hmac.new(secret.encode(), f"prefix-cache:{tenant_id}".encode(), hashlib.sha256).hexdigest()


class CompletionService:
    def __init__(
        self,
        engine: EngineClient,
        files: AdapterFiles | None,
        secret: str,
        resolve: Resolver,
        max_prompts: int = params.MAX_PROMPTS,
    ) -> None:
        self.engine = engine
        self.max_prompts = max_prompts
        self.files = files
        self.secret = secret
        self.resolve = resolve
        self.tokenizer = Tokenizer(engine)  # in worker threads: a long prompt never blocks the event loop

    async def target(self, caller: Caller, model: str) -> Target:
        if model == self.engine.model_name:
            return Target(model=model)
        adapter = await self.resolve(caller.tenant_id, model)
        # Another tenant's adapter and a missing one look exactly alike: same status, same words.
        if adapter is None or self.files is None:
            raise params.model_not_found(model)
        try:
            folder = await self.files.ensure(adapter)
        except Exception as exc:
            # The store is down, or its bytes no longer match the registry's sha256: never hand those to
            # the engine, and never blame the client for it.
            log.warning("adapter %s@%s unavailable: %s", adapter.name, adapter.version, exc)
            raise params.RequestError(
                503,
                f"The adapter '{model}' cannot be loaded right now; try again later.",
                param="model",
                code="adapter_unavailable",
                type_="service_unavailable_error",
            ) from exc
        lora = self.engine.lora_request(f"{adapter.name}@{adapter.version}", folder, adapter.sha256)
        return Target(model=model, adapter=adapter, lora=lora)

    async def prepare_completion(self, caller: Caller, req: CompletionRequest) -> CompletionRun:
        spec = params.completion_spec(req)
        prompts = params.normalize_prompts(req.prompt, self.max_prompts)
        target = await self.target(caller, req.model)
        all_ids: list[list[int]] = []
        texts: list[str] = []
        for i, prompt in enumerate(prompts):
            param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            if isinstance(prompt, params.TokenPrompt):
                params.check_tokens(prompt.token_ids, self.engine.vocab_size, param)
                ids = prompt.token_ids
                if spec.echo:
                    texts.append(await self.tokenizer.decode(ids))
            else:
                ids = await self.tokenizer.encode(prompt.text)
                texts.append(prompt.text)
            # Each prompt must fit the context on its own, as a request of its own would.
            params.fit_context(len(ids), spec.max_tokens, self.engine.max_model_len, param)
            all_ids.append(ids)
        # max_tokens left unset: up to the context of the shortest prompt; the engine stops each
        # prompt's choices at its own context.
        run = self._run("cmpl", caller, target, min(all_ids, key=len), spec, "prompt")
        run.prompt_ids, run.extra_prompts = all_ids[0], all_ids[1:]
        run.prompt_texts = texts if spec.echo else []
        return run

    async def prepare_chat(self, caller: Caller, req: ChatCompletionRequest) -> CompletionRun:
        spec = params.chat_spec(req)
        messages = params.chat_messages(req)
        target = await self.target(caller, req.model)
        ids = await self.tokenizer.apply_chat_template(messages)
        return self._run("chatcmpl", caller, target, ids, spec, "messages")

    def _run(
        self,
        prefix: str,
        caller: Caller,
        target: Target,
        ids: list[int],
        spec: params.SamplingSpec,
        prompt_param: str,
    ) -> CompletionRun:
        max_tokens = params.fit_context(len(ids), spec.max_tokens, self.engine.max_model_len, prompt_param)
        spec.fit(max_tokens, self.engine.vocab_size)
        return CompletionRun(
            request_id=f"{prefix}-{uuid.uuid4().hex}",
            caller=caller,
            target=target,
            prompt_ids=ids,
            spec=spec,
            cache_salt=cache_salt(self.secret, caller.tenant_id),
        )
