"""A local OpenAI-compatible HTTP server that replays scripted answers, for tests of the LLM strategy.

Each POST to /v1/chat/completions takes the next step of the script: an answer (text, with token
counts), an HTTP error (429 with Retry-After, 500...), or a delay before answering (to pass the
client's timeout). Every request body is kept, so a test can read the prompts it was sent. When
the script runs out, the last step repeats (`repeat_last`) or the server answers 500.
"""
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Step:
    text: str = ""
    status: int = 200
    delay_s: float = 0.0
    retry_after: float | None = None
    prompt_tokens: int = 100
    completion_tokens: int = 200


def answer(text: str, **kw) -> Step:
    return Step(text=text, **kw)


def error(status: int, retry_after: float | None = None) -> Step:
    return Step(status=status, retry_after=retry_after)


def slow(seconds: float, text: str = "late") -> Step:
    return Step(text=text, delay_s=seconds)


@dataclass
class ScriptedLLM:
    steps: list[Step]
    repeat_last: bool = False
    requests: list[dict] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        script = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                with script._lock:
                    script.requests.append(body)
                    index = len(script.requests) - 1
                    if index < len(script.steps):
                        step = script.steps[index]
                    elif script.repeat_last and script.steps:
                        step = script.steps[-1]
                    else:
                        step = error(500)
                if step.delay_s:
                    time.sleep(step.delay_s)
                if step.status != 200:
                    payload = {"error": {"message": f"scripted {step.status}", "type": "scripted", "code": step.status}}
                    self._send(step.status, payload, step.retry_after)
                    return
                self._send(200, {
                    "id": f"chatcmpl-{index}", "object": "chat.completion", "created": int(time.time()),
                    "model": body.get("model", "?"),
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": step.text}}],
                    "usage": {"prompt_tokens": step.prompt_tokens, "completion_tokens": step.completion_tokens,
                              "total_tokens": step.prompt_tokens + step.completion_tokens},
                })

            def _send(self, status, payload, retry_after=None):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    if retry_after is not None:
                        self.send_header("retry-after", str(retry_after))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (a timeout step)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def user_prompt(self, i: int) -> str:
        return next(m["content"] for m in self.requests[i]["messages"] if m["role"] == "user")

    def __enter__(self) -> "ScriptedLLM":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
