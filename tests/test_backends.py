"""Model backends: batched transformers generation, the OpenAI-compatible client against a local vLLM stand-in, and
errors that never hang."""

import socket
import time

import pytest
import torch

from trl_agent_distill.agent import (
    BackendError,
    Completion,
    GenerationRequest,
    OpenAIBackend,
    PolicyBackend,
    SamplingParams,
    TransformersBackend,
)
from trl_agent_distill.agent.backends import cut_at_stop

from openai_server import MODEL_NAME, FakeOpenAIServer

pytestmark = pytest.mark.timeout(120)

# Prompts of clearly different lengths, so batching them needs real left padding.
QUESTIONS = [
    "Hi",
    "What is the population of Velmora, the river town on the Sarn, according to the 1931 census of the north?",
    "Add 4210 and 2875, then print it.",
    "Which town is larger, Varnholt or Ostmere? Search both and compare their inhabitants before you answer.",
    "ok",
]
PREFIX = "Thought: Velmora is a river town."


def conversation(question: str) -> list[dict]:
    return [{"role": "system", "content": "Solve tasks."}, {"role": "user", "content": question}]


def greedy(max_new_tokens: int = 16, **kwargs) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, **kwargs)


def texts(results: list[list[Completion]]) -> list[list[str]]:
    return [[completion.text for completion in completions] for completions in results]


def middle_piece(text: str, length: int = 3) -> str:
    """A piece of `text` whose first occurrence is past its start: as a stop string, it cuts the text in two."""
    for start in range(len(text) // 2, len(text) - length):
        piece = text[start : start + length]
        if "\ufffd" not in piece and piece.strip() and text.index(piece) >= 4:
            return piece
    raise AssertionError(f"no usable stop string in {text!r}")


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy CPU their spinning costs seconds per call."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    from trl_agent_distill.tiny import build_tiny_model

    return build_tiny_model(tiny_tokenizer, hidden_size=32, num_layers=2, seed=3)


@pytest.fixture(scope="module")
def backend(model, tiny_tokenizer):
    return TransformersBackend(model, tiny_tokenizer, batch_size=4)


@pytest.fixture(scope="module")
def free_reply(backend):
    """The unconstrained greedy reply to the long question: 24 tokens, no end of turn (a random model)."""
    (reply,) = backend.generate([GenerationRequest(conversation(QUESTIONS[1]), greedy(24))])[0]
    assert reply.finish_reason == "length" and len(reply.text) > 12
    return reply


@pytest.fixture(scope="module")
def server(backend):
    with FakeOpenAIServer(backend) as served:
        yield served


@pytest.fixture
def client(server):
    server.status, server.delay = 200, 0.0
    with OpenAIBackend(server.base_url, MODEL_NAME, request_timeout=30, max_retries=0) as opened:
        yield opened


@pytest.fixture
def misbehaving(server):
    """The server, put back to normal after a test that makes it fail or stall."""
    yield server
    server.status, server.delay = 200, 0.0


# ---------------------------------------------------------------------------------------------- basics
@pytest.mark.parametrize("bad, message", [
    (dict(temperature=-0.5), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(n=0), "n must be"),
])
def test_sampling_params_are_checked(bad, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**bad)


def test_sampling_params_greedy_means_zero_temperature():
    assert SamplingParams().greedy and SamplingParams(temperature=0.0, top_p=0.5).greedy
    assert not SamplingParams(temperature=0.7).greedy


def test_cut_at_stop_takes_the_earliest_stop_string():
    assert cut_at_stop("a<end_code>b Observation: c", ("Observation:", "<end_code>")) == ("a", True)
    assert cut_at_stop("x Observation: y <end_code>", ("<end_code>", "Observation:")) == ("x ", True)
    assert cut_at_stop("no stop here", ("<end_code>",)) == ("no stop here", False)
    assert cut_at_stop("no stop here", ()) == ("no stop here", False)
    assert cut_at_stop("keep", ("",)) == ("keep", False)  # "" is found everywhere: it must be ignored
    assert cut_at_stop("keep|cut", ("", "|")) == ("keep", True)


# ---------------------------------------------------------------------------------------------- transformers
def test_batched_greedy_generation_equals_one_at_a_time(model, tiny_tokenizer):
    requests = [GenerationRequest(conversation(q), greedy(12)) for q in QUESTIONS]
    prompts = [tiny_tokenizer.apply_chat_template(r.messages, tokenize=False, add_generation_prompt=True)
               for r in requests]
    lengths = [len(tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]) for prompt in prompts]
    assert max(lengths) > min(lengths) + 15  # the batch of 4 is really left-padded
    single = TransformersBackend(model, tiny_tokenizer, batch_size=1).generate(requests)
    batched = TransformersBackend(model, tiny_tokenizer, batch_size=4).generate(requests)  # chunks of 4 and 1
    assert texts(batched) == texts(single)
    assert [c[0].finish_reason for c in batched] == [c[0].finish_reason for c in single]
    assert len({c[0].text for c in batched}) > 1 and all(c[0].text for c in batched)


def test_stop_string_cuts_the_reply_before_it(backend, free_reply):
    stop = middle_piece(free_reply.text)
    (stopped,) = backend.generate([GenerationRequest(conversation(QUESTIONS[1]), greedy(24), stop=(stop,))])[0]
    assert stopped == Completion(text=free_reply.text[: free_reply.text.index(stop)], finish_reason="stop")
    # Several stop strings: the earliest wins, whichever comes first in the list.
    first = free_reply.text[1:4] if "\ufffd" not in free_reply.text[1:4] else stop
    stops = ("<never>", stop, first)
    (both,) = backend.generate([GenerationRequest(conversation(QUESTIONS[1]), greedy(24), stop=stops)])[0]
    assert both == Completion(text=cut_at_stop(free_reply.text, stops)[0], finish_reason="stop")


def test_stop_string_is_only_looked_for_in_the_reply(backend, free_reply):
    """The generation prompt ends in a newline; a stop string made of that newline and the reply's first characters
    must not match across the prompt (servers only search the reply), as `generate(stop_strings=...)` would."""
    stop = "\n" + free_reply.text[:3]
    (reply,) = backend.generate([GenerationRequest(conversation(QUESTIONS[1]), greedy(24), stop=(stop,))])[0]
    expected, found = cut_at_stop(free_reply.text, (stop,))
    assert reply == Completion(text=expected, finish_reason="stop" if found else "length")


def test_model_that_never_stops_ends_at_max_new_tokens(backend, tiny_tokenizer, free_reply):
    started = time.monotonic()
    (reply,) = backend.generate([GenerationRequest(conversation(QUESTIONS[1]), greedy(24), stop=("<never>",))])[0]
    assert time.monotonic() - started < 20
    assert reply == free_reply  # "length", and the unused stop string changed nothing
    assert len(tiny_tokenizer(reply.text, add_special_tokens=False)["input_ids"]) <= 24 + 2
    (short,) = backend.generate([GenerationRequest(conversation(QUESTIONS[1]), greedy(5))])[0]
    assert short.finish_reason == "length" and free_reply.text.startswith(short.text) and short.text != free_reply.text


def test_n_samples_per_request(backend):
    torch.manual_seed(0)
    sampling = SamplingParams(temperature=1.5, max_new_tokens=8, n=3)
    results = backend.generate([GenerationRequest(conversation(q), sampling) for q in QUESTIONS[:2]])
    assert [len(samples) for samples in results] == [3, 3]
    assert all(len({s.text for s in samples}) > 1 for samples in results)  # really sampled, not one reply copied


def test_sampling_settings_are_grouped_into_one_generate_call_each(model, tiny_tokenizer, backend, generate_calls):
    sampled = SamplingParams(temperature=0.9, top_p=0.8, max_new_tokens=8, n=3)
    requests = [GenerationRequest(conversation(q), sampled if i % 2 == 0 else greedy(8))
                for i, q in enumerate(QUESTIONS)]
    calls = generate_calls(model)
    torch.manual_seed(0)
    results = TransformersBackend(model, tiny_tokenizer, batch_size=16).generate(requests)
    grouped_calls, calls[:] = list(calls), []
    TransformersBackend(model, tiny_tokenizer, batch_size=2).generate(requests)
    assert sorted(grouped_calls) == [2, 9]  # 2 greedy prompts, 3 sampled prompts x 3 samples: one call each
    assert sorted(calls) == [2, 3, 6]  # batch_size 2 splits the sampled group: 2 then 1 prompt (x 3 samples)
    assert [len(r) for r in results] == [3, 1, 3, 1, 3]
    # Results come back in request order: the greedy ones equal the same requests generated on their own.
    alone = backend.generate([requests[1], requests[3]])
    assert texts([results[1], results[3]]) == texts(alone)


def test_prefix_equals_generating_from_the_rendered_prompt_plus_prefix(model, tiny_tokenizer, backend):
    (completion,) = backend.generate([GenerationRequest(conversation(QUESTIONS[0]), greedy(12), prefix=PREFIX)])[0]
    prompt = tiny_tokenizer.apply_chat_template(conversation(QUESTIONS[0]), tokenize=False, add_generation_prompt=True)
    ids = tiny_tokenizer(prompt + PREFIX, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id)
    expected = tiny_tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert completion.text == expected and expected
    (unforced,) = backend.generate([GenerationRequest(conversation(QUESTIONS[0]), greedy(12))])[0]
    assert unforced.text != expected  # the prefix really steered the reply


def test_tokenizer_without_chat_template_is_refused(model, tiny_tokenizer):
    tokenizer = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer, eos_token="<|im_end|>")
    assert tokenizer.chat_template is None
    with pytest.raises(ValueError, match="chat template"):
        TransformersBackend(model, tokenizer)
    with pytest.raises(ValueError, match="batch_size"):
        TransformersBackend(model, tiny_tokenizer, batch_size=0)


# ---------------------------------------------------------------------------------------------- Python policies
def test_policy_backend_applies_stop_strings_and_checks_n():
    seen = []
    backend = PolicyBackend(lambda request: seen.append(request) or "code```<end_code>tail Observation: x")
    request = GenerationRequest(conversation("q"), SamplingParams(n=2), stop=("Observation:", "<end_code>"))
    assert backend.generate([request]) == [[Completion("code```", "stop")] * 2]
    assert seen == [request]
    two = GenerationRequest(conversation("q"), SamplingParams(n=2), stop=("|",))
    lists = PolicyBackend(lambda request: ["a|b", "c"]).generate([two])
    assert texts(lists) == [["a", "c"]]
    with pytest.raises(ValueError, match="returned 1 replies for a request with n=2"):
        PolicyBackend(lambda request: ["one"]).generate([GenerationRequest(conversation("q"), SamplingParams(n=2))])


# ---------------------------------------------------------------------------------------------- HTTP
def test_openai_backend_matches_the_local_model(client, backend):
    client.check()
    requests = [GenerationRequest(conversation(q), greedy(12)) for q in QUESTIONS[:3]]
    assert client.generate(requests) == backend.generate(requests)


def test_openai_backend_samples_n_replies(client, server):
    sampling = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=6, n=2)
    (two,) = client.generate([GenerationRequest(conversation("Hi"), sampling)])
    assert len(two) == 2 and all(isinstance(c, Completion) for c in two)
    assert {k: server.bodies[-1][k] for k in ("n", "temperature", "top_p", "max_tokens")} == {
        "n": 2, "temperature": 1.0, "top_p": 0.9, "max_tokens": 6}


def test_openai_backend_stop_strings(client, free_reply):
    stop = middle_piece(free_reply.text)
    (stopped,) = client.generate([GenerationRequest(conversation(QUESTIONS[1]), greedy(24), stop=(stop,))])[0]
    assert stopped == Completion(text=free_reply.text[: free_reply.text.index(stop)], finish_reason="stop")
    (free,) = client.generate([GenerationRequest(conversation(QUESTIONS[1]), greedy(24))])[0]
    assert free == free_reply  # finish_reason "length" comes through too


def test_openai_backend_sends_the_prefix_as_a_continued_assistant_message(client, server, backend):
    request = GenerationRequest(conversation(QUESTIONS[0]), greedy(12), prefix=PREFIX)
    assert client.generate([request]) == backend.generate([request])
    body = server.bodies[-1]
    assert body["messages"][-1] == {"role": "assistant", "content": PREFIX}
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False


def test_many_concurrent_requests_come_back_in_order(client, server, backend):
    requests = [GenerationRequest(conversation(f"{QUESTIONS[i % 3]} #{i}"), greedy(6)) for i in range(8)]
    expected = backend.generate(requests)
    assert len({c[0].text for c in expected}) > 1  # order matters: the replies differ
    server.max_in_flight, server.delay = 0, 0.2
    try:
        assert client.generate(requests) == expected
    finally:
        server.delay = 0.0
    assert server.max_in_flight > 1  # the client did send them concurrently


def test_check_names_a_model_the_server_does_not_serve(server):
    with OpenAIBackend(server.base_url, "no-such-model", max_retries=0) as wrong:
        with pytest.raises(BackendError, match=f"does not serve 'no-such-model'.*{MODEL_NAME}"):
            wrong.check()
        with pytest.raises(BackendError, match="HTTP 404.*no-such-model"):
            wrong.generate([GenerationRequest(conversation("q"), greedy(4))])


def test_unreachable_server_is_a_clear_error_not_a_hang():
    url = f"http://127.0.0.1:{closed_port()}/v1"
    started = time.monotonic()
    with OpenAIBackend(url, MODEL_NAME, request_timeout=2, max_retries=1) as unreachable:
        with pytest.raises(BackendError, match=f"Cannot reach the model server at {url}"):
            unreachable.check()
        with pytest.raises(BackendError, match=f"Cannot reach the model server at {url}"):
            unreachable.generate([GenerationRequest(conversation("q"), greedy(4))])
    assert time.monotonic() - started < 8


def test_server_error_is_reported_with_its_status(misbehaving):
    misbehaving.status = 500
    with OpenAIBackend(misbehaving.base_url, MODEL_NAME, max_retries=0) as failing:
        with pytest.raises(BackendError, match=f"{misbehaving.base_url}.*HTTP 500"):
            failing.generate([GenerationRequest(conversation("q"), greedy(4))])
        with pytest.raises(BackendError, match="HTTP 500"):
            failing.check()


def test_stalled_server_times_out(misbehaving):
    misbehaving.delay = 4.0
    started = time.monotonic()
    with OpenAIBackend(misbehaving.base_url, MODEL_NAME, request_timeout=1.0, max_retries=0) as slow:
        with pytest.raises(BackendError, match=r"did not answer within 1.0 s \(request_timeout\).*raise `request_timeout`"):
            slow.generate([GenerationRequest(conversation("q"), greedy(4))])
    assert time.monotonic() - started < 1.0 + 2.0


def test_a_server_that_never_answers_fails_the_check_within_its_own_timeout(misbehaving):
    """It accepts the connection and stalls: the check gives up after `check_timeout`, once, whatever the (long)
    request timeout and its retries."""
    misbehaving.delay = 5.0
    started = time.monotonic()
    with OpenAIBackend(misbehaving.base_url, MODEL_NAME, request_timeout=300, check_timeout=0.5, max_retries=2) as silent:
        with pytest.raises(BackendError, match=r"did not answer within 0.5 s \(check_timeout\).*raise `check_timeout`"):
            silent.check()
    assert time.monotonic() - started < 3.0
    with pytest.raises(ValueError, match="check_timeout must be > 0"):
        OpenAIBackend(misbehaving.base_url, MODEL_NAME, check_timeout=0)


def test_samples_share_their_prompt_encoding_without_changing_the_result(model, tiny_tokenizer):
    """n > 1 encodes each prompt once and copies its cache; near-zero top-p makes sampling greedy, so every sample
    must equal the greedy reply (rows of different lengths check the left padding)."""
    backend = TransformersBackend(model, tiny_tokenizer, batch_size=8)
    greedy_replies = backend.generate([GenerationRequest(conversation(q), greedy(12)) for q in QUESTIONS[:3]])
    near_greedy = SamplingParams(temperature=1.0, top_p=1e-6, max_new_tokens=12, n=3)
    sampled = backend.generate([GenerationRequest(conversation(q), near_greedy) for q in QUESTIONS[:3]])
    for (expected,), samples in zip(greedy_replies, sampled):
        assert [sample.text for sample in samples] == [expected.text] * 3
