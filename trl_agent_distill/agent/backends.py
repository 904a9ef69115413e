"""Model backends: turn chat conversations into assistant replies, many at once.

The agent loop advances all its episodes in lockstep and hands every pending step to `generate` in one call, so a
backend can batch them: `TransformersBackend` runs one left-padded `model.generate` per group of requests with the
same sampling settings; `OpenAIBackend` sends concurrent requests to a server (vLLM, TGI, llama.cpp ...) that
batches them itself. Both cut replies at the first stop string and report why generation ended.

Tool-calling requests carry the tool schemas (`GenerationRequest.tools`): `TransformersBackend` hands them to the chat
template, `OpenAIBackend` sends them as the request's `tools`, and a server that answers with structured
`tool_calls` (vLLM with `--enable-auto-tool-choice --tool-call-parser hermes`) has them written back into the reply
as the Hermes `<tool_call>` text the tool-calling format parses, so every backend returns text.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..formats.tool_calling import tool_calls_reply, with_argument_dicts

logger = logging.getLogger(__name__)


class BackendError(RuntimeError):
    """The model could not be reached or refused a request; the message says which and what to check."""


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one reply. `temperature == 0` is greedy decoding; `n` replies are drawn per request."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    n: int = 1

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1 or self.n < 1:
            raise ValueError(f"max_new_tokens and n must be >= 1, got {self.max_new_tokens} and {self.n}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class GenerationRequest:
    """One pending agent step: the conversation so far and, optionally, the forced start of the reply."""

    messages: list[dict[str, Any]]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    prefix: str = ""
    tools: list[dict[str, Any]] | None = None  # JSON schemas the chat template shows (native tool calling)
    task_id: str | None = None  # the episode's task, for policies that replay a known solution; never sent to a model


@dataclass(frozen=True)
class Completion:
    """A reply after the request's `prefix`, cut before the first stop string.

    `finish_reason` is `"stop"` (a stop string or the end of the turn) or `"length"` (`max_new_tokens` ran out).
    """

    text: str
    finish_reason: str


class GenerationBackend(ABC):
    """Answers a batch of requests with `n` completions each, in request order."""

    @abstractmethod
    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]: ...

    def close(self) -> None:
        """Release what the backend holds (threads, connections)."""

    def __enter__(self) -> GenerationBackend:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the earliest stop string, and whether one was found."""
    positions = [position for s in stop if s and (position := text.find(s)) >= 0]
    if not positions:
        return text, False
    return text[: min(positions)], True


# ---------------------------------------------------------------------------------------------- transformers
class TransformersBackend(GenerationBackend):
    """A local `transformers` causal LM: batched, left-padded generation with stop strings.

    Requests with equal sampling settings and stop strings share a `generate` call (at most `batch_size` prompts,
    each with `n` samples), so per-episode settings cost one call per distinct setting, not one per episode.
    Generation ends at the tokenizer's eos or one of the chat template's end-of-turn tokens, or at a stop string.
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 16):
        from ..chat_template import end_of_turn_tokens

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if tokenizer.chat_template is None:
            raise ValueError(
                "The tokenizer has no chat template; the agent loop sends conversations. Load a chat/instruct "
                "model's tokenizer or set `tokenizer.chat_template`."
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        end_tokens = {tokenizer.eos_token, *end_of_turn_tokens(tokenizer)} - {None}
        self.end_token_ids = sorted(tokenizer.convert_tokens_to_ids(token) for token in end_tokens)
        if not self.end_token_ids:
            raise ValueError("The tokenizer has no eos token and its chat template no end-of-turn token; set one.")
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.end_token_ids[0]

    @classmethod
    def from_pretrained(cls, model_name_or_path: str, *, dtype: str = "auto", device: str | None = None,
                        batch_size: int = 16, **model_kwargs: Any) -> TransformersBackend:
        """Load a hub model, a local directory, a GGUF file (`model_refs.resolve_model`), or a PEFT (LoRA) adapter
        directory on top of its base model.

        `model_kwargs` go to `from_pretrained` (e.g. a 4-bit `quantization_config`); `device` defaults to the
        accelerator when there is one.
        """
        from pathlib import Path

        from accelerate import PartialState
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..model_refs import resolve_model

        model_name_or_path = resolve_model(model_name_or_path)
        adapter = Path(model_name_or_path, "adapter_config.json").is_file()
        if adapter:
            from peft import PeftConfig

            base = PeftConfig.from_pretrained(model_name_or_path).base_model_name_or_path
        else:
            base = model_name_or_path
        has_tokenizer = Path(model_name_or_path, "tokenizer_config.json").is_file()
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path if has_tokenizer or not adapter else base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, **model_kwargs)
        if "quantization_config" not in model_kwargs and "device_map" not in model_kwargs:
            model = model.to(device or PartialState().device)
        if adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, model_name_or_path)
        return cls(model, tokenizer, batch_size=batch_size)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        results: list[list[Completion] | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            groups[(request.sampling, request.stop)].append(index)
        for (sampling, stop), indices in groups.items():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                for index, completions in zip(chunk, self._generate_batch([requests[i] for i in chunk], sampling, stop)):
                    results[index] = completions
        return results  # type: ignore[return-value]

    def _generate_batch(self, requests: list[GenerationRequest], sampling: SamplingParams,
                        stop: tuple[str, ...]) -> list[list[Completion]]:
        import torch
        from transformers import GenerationConfig

        prompts = [
            self.tokenizer.apply_chat_template(with_argument_dicts(r.messages), tools=r.tools, tokenize=False,
                                               add_generation_prompt=True)
            + r.prefix
            for r in requests
        ]
        inputs = self.tokenizer(
            prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
        ).to(self.model.device)
        config = GenerationConfig(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=not sampling.greedy,
            temperature=None if sampling.greedy else sampling.temperature,
            top_p=None if sampling.greedy else sampling.top_p,
            top_k=None,
            num_return_sequences=sampling.n,
            eos_token_id=self.end_token_ids,
            pad_token_id=self.pad_token_id,
        )
        # Not `stop_strings`: generate matches those against the end of prompt + reply (see `_StopInReply`).
        criteria = [_StopInReply(self.tokenizer, stop, inputs["input_ids"].shape[1])] if any(stop) else []
        with torch.inference_mode():
            if sampling.n > 1:
                inputs = self._shared_prefill(inputs, sampling.n)
                config.num_return_sequences = 1
            output = self.model.generate(**inputs, generation_config=config, stopping_criteria=criteria)
        new_tokens = output[:, inputs["input_ids"].shape[1] :].tolist()
        completions = [self._completion(ids, stop, sampling.max_new_tokens) for ids in new_tokens]
        return [completions[i * sampling.n : (i + 1) * sampling.n] for i in range(len(requests))]

    def _shared_prefill(self, inputs, n: int) -> dict[str, Any]:
        """Encode each prompt once and copy its KV cache to its `n` samples (generate would encode it n times).

        Self-consistency samples many candidates from one long prompt, so on a CPU the repeated prefill, not the
        sampling, would dominate. The last prompt token is left for `generate`, which continues from the cache.
        """
        from transformers import DynamicCache

        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: count positions from each row's first token
        cache = DynamicCache(config=self.model.config)
        self.model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
                   past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(n)
        return {"input_ids": ids.repeat_interleave(n, dim=0), "attention_mask": mask.repeat_interleave(n, dim=0),
                "past_key_values": cache}

    def _completion(self, ids: list[int], stop: tuple[str, ...], max_new_tokens: int) -> Completion:
        ended = next((i for i, token in enumerate(ids) if token in self.end_token_ids), None)
        text = self.tokenizer.decode(ids if ended is None else ids[:ended], skip_special_tokens=True)
        text, stopped = cut_at_stop(text, stop)
        # Padding after a finished row is pad tokens, so "length" means the row really used all its tokens.
        finished = stopped or ended is not None or len(ids) < max_new_tokens or ids[-1] == self.pad_token_id
        return Completion(text=text, finish_reason="stop" if finished else "length")


class _StopInReply:
    """A `generate` stopping criterion: a row is done once its reply, not its prompt, contains a stop string.

    `generate(stop_strings=...)` matches the end of the whole sequence, prompt included: with the stop string
    `"\\nObservation"` and a prompt ending in a newline, a reply starting with "Observation" stopped at once, and
    the reply then held no stop string to cut at. Servers (vLLM) look in the reply only, and so does this. A stop
    string just completed lies within the last `4 * len(stop)` tokens (a token holds at least a byte), so only those
    are decoded; missing one would only cost tokens, since replies are cut at the first stop string afterwards.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...], prompt_length: int):
        self.tokenizer, self.stop, self.prompt_length = tokenizer, [s for s in stop if s], prompt_length
        self.window = 4 * max(len(s) for s in self.stop) + 1

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        start = max(self.prompt_length, input_ids.shape[1] - self.window)
        texts = self.tokenizer.batch_decode(input_ids[:, start:].tolist(), skip_special_tokens=True)
        return torch.tensor([any(s in text for s in self.stop) for text in texts], device=input_ids.device)


# ---------------------------------------------------------------------------------------------- HTTP
class OpenAIBackend(GenerationBackend):
    """A model behind an OpenAI-compatible chat completions endpoint (vLLM, TGI, SGLang, llama.cpp, OpenAI).

    Requests are sent concurrently (`max_concurrency`), so the server can batch them. A forced reply prefix is sent
    as a final assistant message with vLLM's `continue_final_message` (servers without it reject the request with
    a clear error). Connection failures raise `BackendError` after the client's retries, never hang: each request
    has a `request_timeout` (generation can be slow), and the start-up `check` its own short `check_timeout`, tried
    once: a server that accepts connections but never answers is reported in seconds, not after the retries of a
    generation's timeout.
    """

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, request_timeout: float = 120.0,
                 check_timeout: float = 10.0, max_retries: int = 2, max_concurrency: int = 32):
        import openai

        if not (request_timeout > 0 and check_timeout > 0):
            raise ValueError(f"request_timeout and check_timeout must be > 0, got {request_timeout}, {check_timeout}")
        self.base_url = base_url
        self.model = model
        self.max_concurrency = max_concurrency
        self.check_timeout = check_timeout
        self.client = openai.OpenAI(
            base_url=base_url, api_key=api_key or "EMPTY", timeout=request_timeout, max_retries=max_retries
        )
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="openai-backend")

    def check(self) -> None:
        """Fail fast, before any episode starts, when the server is unreachable, silent, or does not serve `model`."""
        client = self.client.with_options(timeout=self.check_timeout, max_retries=0)
        served = [entry.id for entry in self._call(client.models.list, timeout_option="check_timeout")]
        if served and self.model not in served:
            raise BackendError(f"The server at {self.base_url} does not serve {self.model!r}; it serves {served}.")

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        return list(self._pool.map(self._generate_one, requests))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.client.close()

    def _generate_one(self, request: GenerationRequest) -> list[Completion]:
        messages = list(request.messages)
        extra_body: dict[str, Any] = {}
        if request.prefix:
            messages.append({"role": "assistant", "content": request.prefix})
            extra_body = {"continue_final_message": True, "add_generation_prompt": False}
        sampling = request.sampling
        response = self._call(
            self.client.chat.completions.create,
            model=self.model,
            messages=messages,
            max_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            n=sampling.n,
            stop=list(request.stop) or None,
            extra_body=extra_body or None,
            **({"tools": request.tools} if request.tools else {}),
        )
        choices = sorted(response.choices, key=lambda choice: choice.index)
        return [self._completion(choice, request.stop) for choice in choices]

    @staticmethod
    def _completion(choice, stop: tuple[str, ...]) -> Completion:
        # Servers drop the stop string themselves; cutting again covers those that include it.
        text, _ = cut_at_stop(choice.message.content or "", stop)
        calls = getattr(choice.message, "tool_calls", None) or []
        if calls:
            text = tool_calls_reply(text, [(call.function.name, call.function.arguments) for call in calls])
        return Completion(text=text, finish_reason="length" if choice.finish_reason == "length" else "stop")

    def _call(self, method, *, timeout_option: str = "request_timeout", **kwargs):
        import openai

        try:
            return method(**kwargs)
        except openai.APITimeoutError as error:
            seconds = (self.check_timeout if timeout_option == "check_timeout" else self.client.timeout)
            raise BackendError(
                f"The model server at {self.base_url} did not answer within {seconds} s ({timeout_option}); check that "
                f"it is running and not overloaded, or raise `{timeout_option}`."
            ) from error
        except openai.APIConnectionError as error:
            raise BackendError(
                f"Cannot reach the model server at {self.base_url} ({error.__cause__ or error}); start it or fix "
                "the base URL."
            ) from error
        except openai.APIStatusError as error:
            raise BackendError(
                f"The model server at {self.base_url} refused the request with HTTP {error.status_code}: "
                f"{error.message}"
            ) from error


# ---------------------------------------------------------------------------------------------- Python
class PolicyBackend(GenerationBackend):
    """Replies written by a Python function: scripted agents in tests, oracle policies that demonstrate a task.

    `policy(request)` returns the reply after `request.prefix`, or a list of `n` replies; stop strings are applied
    as a model server would, so the agent loop sees exactly what a model would have produced.
    """

    def __init__(self, policy: Callable[[GenerationRequest], str | Sequence[str]]):
        self.policy = policy

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        results = []
        for request in requests:
            replies = self.policy(request)
            replies = [replies] * request.sampling.n if isinstance(replies, str) else list(replies)
            if len(replies) != request.sampling.n:
                raise ValueError(f"The policy returned {len(replies)} replies for a request with n={request.sampling.n}.")
            results.append([Completion(text=cut_at_stop(reply, request.stop)[0], finish_reason="stop") for reply in replies])
        return results
