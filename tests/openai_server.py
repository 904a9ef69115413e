"""A test double for vLLM: an OpenAI-compatible chat completions server on 127.0.0.1 over a tiny local model.

Standard library only (`ThreadingHTTPServer` on a free port, in a daemon thread). It serves `GET /v1/models` and
`POST /v1/chat/completions` (model, messages, max_tokens, temperature, top_p, n, stop as a string or a list, and
vLLM's `continue_final_message` / `add_generation_prompt`: the final assistant message is then the forced start of
the reply) through `TransformersBackend`, one generation at a time. An unknown model is a 404 with an OpenAI-style
error body, a request the backend rejects a 400. To test a client's error handling it can answer every request with
an error (`status=500`) or stall (`delay` seconds) first; both are attributes, so a test can flip them on a running
server. `bodies` keeps every JSON body received, `max_in_flight` the most requests handled at once.

Tool calling: a request's `tools` go to the backend's chat template, and with `tool_parser="hermes"` the server
answers as vLLM's `--tool-call-parser hermes` does: the `<tool_call>` blocks of the reply become structured
`tool_calls` (finish reason "tool_calls"), the rest stays `content`. The backend may also be a `PolicyBackend`
(scripted replies; usage then counts words).

    with FakeOpenAIServer(backend) as server:
        client = OpenAIBackend(server.base_url, server.model_name)
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from trl_agent_distill.agent import GenerationRequest, SamplingParams, TransformersBackend

MODEL_NAME = "tiny-teacher"
_HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def error_body(message: str, kind: str, code: int) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class FakeOpenAIServer:
    def __init__(self, backend: TransformersBackend, model_name: str = MODEL_NAME, *, status: int = 200,
                 delay: float = 0.0, tool_parser: str | None = None):
        self.backend, self.model_name = backend, model_name
        self.status, self.delay = status, delay
        self.tool_parser = tool_parser
        self.bodies: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self._generate_lock, self._count_lock = threading.Lock(), threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._server.handle_error = lambda request, address: None  # a client that timed out and hung up: no noise
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="fake-openai-server")
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeOpenAIServer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def complete(self, body: dict) -> tuple[int, dict]:
        """The status and JSON body answering one chat completions request."""
        if body.get("model") != self.model_name:
            return 404, error_body(f"The model `{body.get('model')}` does not exist.", "NotFoundError", 404)
        messages, prefix = list(body.get("messages") or []), ""
        if body.get("continue_final_message"):
            if body.get("add_generation_prompt", True):  # vLLM refuses both at once
                return 400, error_body("continue_final_message and add_generation_prompt are both set.",
                                       "BadRequestError", 400)
            if not messages or messages[-1].get("role") != "assistant":
                return 400, error_body("continue_final_message needs a final assistant message.",
                                       "BadRequestError", 400)
            prefix = messages.pop()["content"]
        stop = body.get("stop") or ()
        given = lambda key, default: default if body.get(key) is None else body[key]  # noqa: E731 (null: default)
        try:
            sampling = SamplingParams(temperature=given("temperature", 1.0), top_p=given("top_p", 1.0),
                                      max_new_tokens=given("max_tokens", 16), n=given("n", 1))
            request = GenerationRequest(messages=messages, sampling=sampling, prefix=prefix,
                                        stop=(stop,) if isinstance(stop, str) else tuple(stop),
                                        tools=body.get("tools"))
            with self._generate_lock:
                (completions,) = self.backend.generate([request])
        except (ValueError, TypeError, KeyError) as error:
            return 400, error_body(str(error), "BadRequestError", 400)
        tokenizer = getattr(self.backend, "tokenizer", None)
        if tokenizer is None:
            count = lambda text: len(text.split())  # noqa: E731
            prompt = "\n".join(str(message.get("content") or "") for message in messages) + prefix
        else:
            count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
            prompt = tokenizer.apply_chat_template(messages, tools=request.tools, tokenize=False,
                                                   add_generation_prompt=True) + prefix
        prompt_tokens = count(prompt)
        completion_tokens = sum(count(c.text) for c in completions)
        choices = [{"index": i, **self._message(c)} for i, c in enumerate(completions)]
        return 200, {"id": f"chatcmpl-{len(self.bodies)}", "object": "chat.completion", "created": int(time.time()),
                     "model": self.model_name, "choices": choices,
                     "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                               "total_tokens": prompt_tokens + completion_tokens}}

    def _message(self, completion) -> dict:
        """A choice's message and finish reason; with the hermes tool parser, its calls as `tool_calls`."""
        blocks = _HERMES_BLOCK.findall(completion.text) if self.tool_parser == "hermes" else []
        calls = []
        for index, block in enumerate(blocks):
            try:
                call = json.loads(block)
            except json.JSONDecodeError:  # vLLM leaves what it cannot parse in the content
                return {"message": {"role": "assistant", "content": completion.text},
                        "finish_reason": completion.finish_reason}
            calls.append({"id": f"chatcmpl-tool-{index}", "type": "function", "function": {
                "name": call["name"], "arguments": json.dumps(call.get("arguments", {}))}})
        if not calls:
            return {"message": {"role": "assistant", "content": completion.text},
                    "finish_reason": completion.finish_reason}
        content = _HERMES_BLOCK.sub("", completion.text).strip() or None
        return {"message": {"role": "assistant", "content": content, "tool_calls": calls},
                "finish_reason": "tool_calls"}

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _reply(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _serve(self, answer) -> None:
                with server._count_lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    time.sleep(server.delay)
                    if server.status != 200:
                        self._reply(server.status, error_body("injected failure", "InternalServerError", server.status))
                    else:
                        self._reply(*answer())
                finally:
                    with server._count_lock:
                        server.in_flight -= 1

            def do_GET(self):
                if self.path.rstrip("/") == "/v1/models":
                    self._serve(lambda: (200, {"object": "list", "data": [
                        {"id": server.model_name, "object": "model", "created": 0, "owned_by": "vllm"}]}))
                else:
                    self._serve(lambda: (404, error_body(f"no route {self.path}", "NotFoundError", 404)))

            def do_POST(self):
                try:
                    body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                except json.JSONDecodeError as error:
                    invalid = error_body(f"invalid JSON: {error}", "BadRequestError", 400)
                    return self._serve(lambda: (400, invalid))
                server.bodies.append(body)
                if self.path.rstrip("/") == "/v1/chat/completions":
                    self._serve(lambda: server.complete(body))
                else:
                    self._serve(lambda: (404, error_body(f"no route {self.path}", "NotFoundError", 404)))

        return Handler
