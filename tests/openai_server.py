"""A test double for vLLM: an OpenAI-compatible chat completions server on 127.0.0.1 over a tiny local model.

Standard library only. It serves `GET /v1/models` and `POST /v1/chat/completions` (model, messages, max_tokens,
temperature, top_p, n, stop, and vLLM's `continue_final_message`) through `TransformersBackend`, and can be told to
fail (`status=500`) or to stall (`delay` seconds) so that clients' error handling can be tested.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from trl_agent_distill.agent import GenerationRequest, SamplingParams, TransformersBackend


class FakeOpenAIServer:
    def __init__(self, backend: TransformersBackend, model_name: str = "tiny-teacher"):
        self.backend, self.model_name = backend, model_name
        self.status, self.delay, self.requests = 200, 0.0, 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def complete(self, body: dict) -> tuple[int, dict]:
        if body.get("model") != self.model_name:
            return 404, {"error": {"message": f"The model `{body.get('model')}` does not exist.", "type": "NotFoundError"}}
        messages, prefix = list(body["messages"]), ""
        if body.get("continue_final_message"):
            prefix = messages.pop()["content"]
        stop = body.get("stop") or ()
        sampling = SamplingParams(temperature=body.get("temperature", 1.0), top_p=body.get("top_p", 1.0),
                                  max_new_tokens=body.get("max_tokens", 16), n=body.get("n", 1))
        request = GenerationRequest(messages=messages, sampling=sampling, prefix=prefix,
                                    stop=(stop,) if isinstance(stop, str) else tuple(stop))
        with self._lock:
            (completions,) = self.backend.generate([request])
        choices = [
            {"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason}
            for i, c in enumerate(completions)
        ]
        return 200, {"id": f"chatcmpl-{self.requests}", "object": "chat.completion", "created": int(time.time()),
                     "model": self.model_name, "choices": choices,
                     "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}

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

            def _misbehave(self) -> bool:
                server.requests += 1
                time.sleep(server.delay)
                if server.status != 200:
                    self._reply(server.status, {"error": {"message": "injected failure", "type": "server_error"}})
                    return True
                return False

            def do_GET(self):
                if self._misbehave():
                    return
                if self.path.rstrip("/") == "/v1/models":
                    self._reply(200, {"object": "list", "data": [{"id": server.model_name, "object": "model"}]})
                else:
                    self._reply(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if self._misbehave():
                    return
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._reply(404, {"error": {"message": f"no route {self.path}"}})
                    return
                self._reply(*server.complete(body))

        return Handler
