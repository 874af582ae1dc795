"""A Vertex AI REST API stand-in on 127.0.0.1 that records every request.

The real google-cloud-aiplatform SDK is pointed at it (``aiplatform.init(api_endpoint=
"http://127.0.0.1:PORT", api_transport="rest", credentials=AnonymousCredentials())``); it
answers the calls clipa makes with plausible resources and keeps them, so a test can
assert on exactly what the SDK sent:

    POST   v1/projects/P/locations/L/pipelineJobs?pipelineJobId=ID   -> the job, PENDING
    GET    v1/.../pipelineJobs/ID                                   -> the job
    POST   v1/.../schedules                                         -> the schedule, ACTIVE
    GET    v1/.../schedules[?filter=...]                             -> {"schedules": [...]}
    GET    v1/.../schedules/ID                                      -> the schedule
    POST   v1/.../schedules/ID:pause | :resume                      -> {} (state changes)
    DELETE v1/.../schedules/ID                                      -> a done operation
    POST   v1/.../models:upload                                     -> a done operation, model 1
    POST   /token                                                   -> an OAuth access token

``/token`` serves as the ``token_uri`` of a service-account key file
(GOOGLE_APPLICATION_CREDENTIALS), for code that refreshes its own Google credentials.
"""
from __future__ import annotations

import contextlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

_PARENT = r"/v1(?:beta1)?/(projects/[^/]+/locations/[^/]+)"
_NOW = "2026-01-01T00:00:00Z"


@dataclass
class Recorded:
    """One request: method, path (no query), query (name -> first value), JSON body."""
    method: str
    path: str
    query: dict
    body: dict | None


@dataclass
class VertexState:
    requests: list = field(default_factory=list)
    jobs: dict = field(default_factory=dict)       # resource name -> job
    schedules: dict = field(default_factory=dict)  # resource name -> schedule

    def of(self, method: str, suffix: str = "") -> list[Recorded]:
        """The recorded requests with ``method`` whose path ends with ``suffix``."""
        return [r for r in self.requests if r.method == method and r.path.endswith(suffix)]


def _handler(state: VertexState, lock: threading.Lock):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output quiet
            pass

        def _reply(self, code: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _handle(self, method: str) -> None:
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else None
            except ValueError:  # a form post (the OAuth token request)
                body = {k: v[0] for k, v in parse_qs(raw.decode()).items()}
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            with lock:
                state.requests.append(Recorded(method, url.path, query, body))
                code, payload = _route(state, method, url.path, query, body)
            self._reply(code, payload)

        def do_GET(self):
            self._handle("GET")

        def do_POST(self):
            self._handle("POST")

        def do_DELETE(self):
            self._handle("DELETE")

        def do_PATCH(self):
            self._handle("PATCH")

    return Handler


def _route(state: VertexState, method: str, path: str, query: dict, body):
    """(status, JSON) for one request; 404 with a message for anything else."""
    if path == "/token" and method == "POST":
        return 200, {"access_token": "recorded-token", "expires_in": 3600, "token_type": "Bearer"}
    m = re.fullmatch(_PARENT + r"/models:upload", path)
    if m and method == "POST":
        return 200, {"name": f"{m.group(1)}/models/1/operations/2", "done": True,
                     "response": {"@type": "type.googleapis.com/google.cloud.aiplatform.v1.UploadModelResponse",
                                  "model": f"{m.group(1)}/models/1", "modelVersionId": "1"}}
    m = re.fullmatch(_PARENT + r"/pipelineJobs", path)
    if m and method == "POST":
        name = f"{m.group(1)}/pipelineJobs/{query.get('pipelineJobId', 'job-1')}"
        job = {**body, "name": name, "state": "PIPELINE_STATE_PENDING", "createTime": _NOW}
        state.jobs[name] = job
        return 200, job
    m = re.fullmatch(_PARENT + r"/(pipelineJobs/[^/:]+)", path)
    if m and method == "GET" and f"{m.group(1)}/{m.group(2)}" in state.jobs:
        return 200, state.jobs[f"{m.group(1)}/{m.group(2)}"]
    m = re.fullmatch(_PARENT + r"/schedules", path)
    if m and method == "POST":
        name = f"{m.group(1)}/schedules/{len(state.schedules) + 1}"
        sched = {**body, "name": name, "state": "ACTIVE", "createTime": _NOW, "startedRunCount": "0"}
        state.schedules[name] = sched
        return 200, sched
    if m and method == "GET":
        return 200, {"schedules": list(state.schedules.values())}
    m = re.fullmatch(_PARENT + r"/(schedules/[^/:]+)(:pause|:resume)?", path)
    if m:
        name = f"{m.group(1)}/{m.group(2)}"
        if name not in state.schedules:
            return 404, {"error": {"code": 404, "message": f"{name} not found", "status": "NOT_FOUND"}}
        if method == "GET":
            return 200, state.schedules[name]
        if method == "POST" and m.group(3):
            state.schedules[name]["state"] = "PAUSED" if m.group(3) == ":pause" else "ACTIVE"
            return 200, {}
        if method == "DELETE":
            del state.schedules[name]
            return 200, {"name": f"{m.group(1)}/operations/1", "done": True,
                         "response": {"@type": "type.googleapis.com/google.protobuf.Empty"}}
    return 404, {"error": {"code": 404, "message": f"no route for {method} {path}", "status": "NOT_FOUND"}}


@contextlib.contextmanager
def recording_vertex():
    """Serve the stand-in on a free port. Yields (endpoint "http://127.0.0.1:PORT", state)."""
    state = VertexState()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state, threading.Lock()))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()
