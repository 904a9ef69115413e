"""Model backends: batched transformers generation, the OpenAI-compatible client against a local server, and errors
that never hang."""

import socket
import time

import pytest
import torch

from trl_agent_distill.agent import (
    BackendError,
    GenerationRequest,
    OpenAIBackend,
    PolicyBackend,
    SamplingParams,
    TransformersBackend,
)
from trl_agent_distill.agent.backends import cut_at_stop

from openai_server import FakeOpenAIServer

pytestmark = pytest.mark.timeout(120)

QUESTIONS = ["Hi", "What is the population of Velmora, the river town on the Sarn?", "Add 4210 and 2875, then print it."]


def conversation(question: str) -> list[dict]:
    return [{"role": "system", "content": "Solve tasks."}, {"role": "user", "content": question}]


def greedy(max_new_tokens=16, **kwargs) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, **kwargs)


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    from trl_agent_distill.tiny import build_tiny_model

    return build_tiny_model(tiny_tokenizer, hidden_size=32, num_layers=2, seed=3)


@pytest.fixture(scope="module")
def backend(model, tiny_tokenizer):
    return TransformersBackend(model, tiny_tokenizer, batch_size=4)


@pytest.fixture(scope="module")
def server(backend):
    served = FakeOpenAIServer(backend)
    yield served
    served.stop()


@pytest.fixture
def client(server):
    server.status, server.delay = 200, 0.0
    with OpenAIBackend(server.base_url, server.model_name, timeout=30, max_retries=0) as opened:
        yield opened


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------------------------------------- basics
def test_sampling_params_are_checked():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(max_new_tokens=0), dict(n=0)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    assert SamplingParams().greedy and not SamplingParams(temperature=0.7).greedy


def test_cut_at_stop_takes_the_earliest_stop_string():
    assert cut_at_stop("a<end_code>b Observation: c", ("Observation:", "<end_code>")) == ("a", True)
    assert cut_at_stop("no stop here", ("<end_code>",)) == ("no stop here", False)
    assert cut_at_stop("keep", ("",)) == ("keep", False)


# ---------------------------------------------------------------------------------------------- transformers
def test_batched_greedy_generation_equals_one_at_a_time(model, tiny_tokenizer):
    requests = [GenerationRequest(conversation(q), greedy()) for q in QUESTIONS]
    batched = TransformersBackend(model, tiny_tokenizer, batch_size=4).generate(requests)
    single = TransformersBackend(model, tiny_tokenizer, batch_size=1).generate(requests)
    assert [c[0].text for c in batched] == [c[0].text for c in single]
    assert len({c[0].text for c in batched}) > 1  # the prompts really differ


def test_stop_string_cuts_the_reply(backend):
    (free,) = backend.generate([GenerationRequest(conversation(QUESTIONS[1]), greedy(24))])[0]
    assert free.finish_reason == "length" and len(free.text) > 12
    stop = free.text[len(free.text) // 2 : len(free.text) // 2 + 3]
    (stopped,) = backend.generate([GenerationRequest(conversation(QUESTIONS[1]), greedy(24), stop=(stop,))])[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.index(stop)]


def test_model_that_never_stops_ends_at_max_new_tokens(backend, tiny_tokenizer):
    started = time.monotonic()
    (completion,) = backend.generate([GenerationRequest(conversation("Hi"), greedy(10), stop=("<never>",))])[0]
    assert completion.finish_reason == "length" and time.monotonic() - started < 20
    assert len(tiny_tokenizer(completion.text, add_special_tokens=False)["input_ids"]) <= 12


def test_sampling_settings_are_grouped_and_n_samples_returned(model, tiny_tokenizer):
    backend = TransformersBackend(model, tiny_tokenizer, batch_size=16)
    calls = []
    original = model.generate

    def counting(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    sampled = SamplingParams(temperature=0.9, top_p=0.8, max_new_tokens=8, n=3)
    requests = [GenerationRequest(conversation(q), greedy(8) if i % 2 else sampled) for i, q in enumerate(QUESTIONS * 2)]
    model.generate = counting
    try:
        torch.manual_seed(0)
        results = backend.generate(requests)
    finally:
        del model.generate
    assert sorted(calls) == [3, 9]  # one call per distinct setting (3 prompts, or 3 prompts x 3 samples)
    assert [len(r) for r in results] == [3 if i % 2 == 0 else 1 for i in range(6)]


def test_prefix_is_forced_before_the_reply(model, tiny_tokenizer, backend):
    prefix = "Thought: Velmora is a river town."
    (completion,) = backend.generate([GenerationRequest(conversation(QUESTIONS[0]), greedy(12), prefix=prefix)])[0]
    prompt = tiny_tokenizer.apply_chat_template(conversation(QUESTIONS[0]), tokenize=False, add_generation_prompt=True)
    ids = tiny_tokenizer(prompt + prefix, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id)
    expected = tiny_tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert completion.text == expected


def test_tokenizer_without_chat_template_is_refused(model, tiny_tokenizer):
    tokenizer = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer, eos_token="<|im_end|>")
    assert tokenizer.chat_template is None
    with pytest.raises(ValueError, match="chat template"):
        TransformersBackend(model, tokenizer)


def test_policy_backend_applies_stop_strings_and_checks_n():
    backend = PolicyBackend(lambda request: "code```<end_code>tail")
    (completion,) = backend.generate([GenerationRequest(conversation("q"), stop=("<end_code>",))])[0]
    assert completion.text == "code```" and completion.finish_reason == "stop"
    with pytest.raises(ValueError, match="returned 1 replies for a request with n=2"):
        PolicyBackend(lambda request: ["one"]).generate([GenerationRequest(conversation("q"), SamplingParams(n=2))])


# ---------------------------------------------------------------------------------------------- HTTP
def test_openai_backend_matches_the_local_model(client, backend):
    client.check()
    requests = [GenerationRequest(conversation(q), greedy(12)) for q in QUESTIONS]
    remote = client.generate(requests)
    local = backend.generate(requests)
    assert [c[0].text for c in remote] == [c[0].text for c in local]
    assert [c[0].finish_reason for c in remote] == [c[0].finish_reason for c in local]


def test_openai_backend_n_stop_and_prefix(client, backend):
    (two,) = client.generate([GenerationRequest(conversation("Hi"), SamplingParams(temperature=1.0, max_new_tokens=6, n=2))])
    assert len(two) == 2
    (free,) = backend.generate([GenerationRequest(conversation(QUESTIONS[1]), greedy(24))])[0]
    stop = free.text[len(free.text) // 2 : len(free.text) // 2 + 3]
    (stopped,) = client.generate([GenerationRequest(conversation(QUESTIONS[1]), greedy(24), stop=(stop,))])[0]
    assert stopped.text == free.text[: free.text.index(stop)] and stopped.finish_reason == "stop"
    prefix = "Thought: Velmora is a river town."
    request = GenerationRequest(conversation(QUESTIONS[0]), greedy(12), prefix=prefix)
    assert client.generate([request]) == backend.generate([request])


def test_many_concurrent_requests_come_back_in_order(client, backend):
    requests = [GenerationRequest(conversation(f"{q} #{i}"), greedy(6)) for i, q in enumerate(QUESTIONS * 3)]
    assert client.generate(requests) == backend.generate(requests)


def test_check_names_a_model_the_server_does_not_serve(server):
    with OpenAIBackend(server.base_url, "no-such-model", max_retries=0) as wrong:
        with pytest.raises(BackendError, match="does not serve 'no-such-model'.*tiny-teacher"):
            wrong.check()


def test_unreachable_server_is_a_clear_error_not_a_hang():
    url = f"http://127.0.0.1:{closed_port()}/v1"
    started = time.monotonic()
    with OpenAIBackend(url, "teacher", timeout=5, max_retries=1) as unreachable:
        with pytest.raises(BackendError, match=f"Cannot reach the model server at {url}"):
            unreachable.generate([GenerationRequest(conversation("q"), greedy(4))])
    assert time.monotonic() - started < 10


def test_server_errors_and_stalls_are_reported(server):
    server.status = 500
    try:
        with OpenAIBackend(server.base_url, server.model_name, max_retries=0) as failing:
            with pytest.raises(BackendError, match="HTTP 500"):
                failing.generate([GenerationRequest(conversation("q"), greedy(4))])
    finally:
        server.status = 200
    server.delay = 3.0
    try:
        started = time.monotonic()
        with OpenAIBackend(server.base_url, server.model_name, timeout=1.0, max_retries=0) as slow:
            with pytest.raises(BackendError, match="did not answer within the timeout"):
                slow.generate([GenerationRequest(conversation("q"), greedy(4))])
        assert time.monotonic() - started < 6
    finally:
        server.delay = 0.0


def test_samples_share_their_prompt_encoding_without_changing_the_result(model, tiny_tokenizer):
    """n > 1 encodes each prompt once and copies its cache; near-zero top-p makes sampling greedy, so every sample
    must equal the greedy reply (rows of different lengths check the left padding)."""
    backend = TransformersBackend(model, tiny_tokenizer, batch_size=8)
    greedy_replies = backend.generate([GenerationRequest(conversation(q), greedy(12)) for q in QUESTIONS])
    near_greedy = SamplingParams(temperature=1.0, top_p=1e-6, max_new_tokens=12, n=3)
    sampled = backend.generate([GenerationRequest(conversation(q), near_greedy) for q in QUESTIONS])
    for (expected,), samples in zip(greedy_replies, sampled):
        assert [sample.text for sample in samples] == [expected.text] * 3
