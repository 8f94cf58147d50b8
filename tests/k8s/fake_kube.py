"""A fake Kubernetes API server on 127.0.0.1: the paths tasks/kubernetes.py uses, with scripted pods.

Speaks the real wire protocol, so the official client's serialization, watch streaming
(JSON lines, resourceVersion resume, timeoutSeconds) and log following are exercised:

    POST   /api/v1/namespaces/{ns}/services                    create the headless Service
    POST   /apis/batch/v1/namespaces/{ns}/jobs                 create the Indexed Job -> scripted pods
    GET    /api/v1/namespaces/{ns}/pods?watch=true&...         pod events after resourceVersion
    GET    /api/v1/namespaces/{ns}/pods/{pod}/log[?follow|tailLines]
    DELETE /apis/batch/v1/namespaces/{ns}/jobs/{name}          (records propagationPolicy)
    DELETE /api/v1/namespaces/{ns}/services/{name}

A scenario says what each job's pods do: ``succeed``, ``fail`` (the last index exits 1),
``evict`` (index 0 is evicted by the kubelet), ``preempt`` (index 0 gets DisruptionTarget
and is deleted), ``pending`` (never scheduled), ``bad-config`` (CreateContainerConfigError).
``scenarios`` is consumed one per created job, so a retry can meet a different fate.

Bounded: one watch response lasts at most ``watch_max_s`` (or the client's timeoutSeconds),
a followed log at most its lines, and every handler thread is a daemon of a server that the
fixture shuts down. Nothing binds anything but 127.0.0.1.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

INDEX = "batch.kubernetes.io/job-completion-index"


class FakeKube:
    def __init__(self, scenarios: list[str], step_s: float = 0.05, watch_max_s: float = 1.0):
        self.scenarios = list(scenarios)
        self.step_s, self.watch_max_s = step_s, watch_max_s
        self.requests: list[tuple[str, str, dict]] = []  # (method, path, query)
        self.jobs: dict[str, dict] = {}
        self.services: dict[str, dict] = {}
        self.created: list[dict] = []  # request bodies of every POST, in order
        self.deleted: list[tuple[str, str, dict]] = []  # (kind, name, query)
        self.events: list[tuple[float, int, str, dict]] = []  # (ready_at, resourceVersion, type, pod)
        self.logs: dict[str, list[str]] = {}
        self._rv = 1000
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # --- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> FakeKube:
        fake = self

        class Handler(_Handler):
            kube = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def api_client(self):
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = self.url
        return client.ApiClient(cfg)

    def paths(self, method: str | None = None) -> list[str]:
        return [p for m, p, _ in self.requests if method is None or m == method]

    # --- the scripted "controller" ------------------------------------------------------------
    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def _emit(self, at: float, kind: str, pod: dict) -> None:
        pod = copy.deepcopy(pod)
        rv = self._next_rv()
        pod["metadata"]["resourceVersion"] = str(rv)
        self.events.append((at, rv, kind, pod))

    def create_job(self, ns: str, body: dict) -> dict:
        with self._lock:
            name = body["metadata"]["name"]
            scenario = self.scenarios.pop(0) if self.scenarios else "succeed"
            body = copy.deepcopy(body)
            body["metadata"].update(uid=f"uid-{name}", resourceVersion=str(self._next_rv()))
            self.jobs[name] = body
            n = body["spec"]["completions"]
            template = body["spec"]["template"]
            now, s = time.monotonic(), self.step_s
            for i in range(n):
                pod_name = f"{name}-{i}-abcde"
                pod = {"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": pod_name, "namespace": ns, "labels": dict(template["metadata"]["labels"]),
                                    "annotations": {INDEX: str(i)}},
                       "spec": copy.deepcopy(template["spec"]),
                       "status": {"phase": "Pending"}}
                self.logs[pod_name] = [f"rank {i}: step {k} loss {3.0 - k / 10:.2f}" for k in range(5)]
                self._emit(now, "ADDED", pod)
                if scenario == "pending":
                    continue
                if scenario == "bad-config" and i == 0:
                    pod["status"]["containerStatuses"] = [_waiting("CreateContainerConfigError",
                                                                   'secret "dlm-object-store" not found')]
                    self._emit(now + s, "MODIFIED", pod)
                    continue
                pod["status"] = {"phase": "Running", "containerStatuses": [_running()]}
                self._emit(now + s, "MODIFIED", pod)
                if scenario == "fail" and i == n - 1:
                    self.logs[pod_name] += ["Traceback (most recent call last):", "RuntimeError: CUDA error: boom"]
                    pod["status"] = {"phase": "Failed",
                                     "containerStatuses": [_terminated(1, "Error")]}
                    self._emit(now + 2 * s, "MODIFIED", pod)
                elif scenario == "evict" and i == 0:
                    pod["status"] = {"phase": "Failed", "reason": "Evicted",
                                     "message": "The node was low on resource: memory.",
                                     "conditions": [{"type": "DisruptionTarget", "status": "True",
                                                     "reason": "TerminationByKubelet"}]}
                    self._emit(now + 2 * s, "MODIFIED", pod)
                elif scenario == "preempt" and i == 0:
                    pod["status"]["conditions"] = [{"type": "DisruptionTarget", "status": "True",
                                                    "reason": "PreemptionByScheduler"}]
                    self._emit(now + 2 * s, "MODIFIED", pod)
                    self._emit(now + 3 * s, "DELETED", pod)
                elif scenario in ("succeed", "fail", "evict", "preempt"):
                    pod["status"] = {"phase": "Succeeded", "containerStatuses": [_terminated(0, "Completed")]}
                    self._emit(now + (3 + i) * s, "MODIFIED", pod)
            return body

    def watch_events(self, selector: str, since: int | None):
        key, _, value = selector.partition("=")
        with self._lock:
            return [(at, rv, kind, pod) for at, rv, kind, pod in self.events
                    if (since is None or rv > since) and pod["metadata"]["labels"].get(key) == value]


def _running() -> dict:
    return {"name": "trainer", "ready": True, "restartCount": 0, "image": "x", "imageID": "",
            "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}


def _waiting(reason: str, message: str) -> dict:
    return {"name": "trainer", "ready": False, "restartCount": 0, "image": "x", "imageID": "",
            "state": {"waiting": {"reason": reason, "message": message}}}


def _terminated(code: int, reason: str) -> dict:
    return {"name": "trainer", "ready": False, "restartCount": 0, "image": "x", "imageID": "",
            "state": {"terminated": {"exitCode": code, "reason": reason}}}


_NS = r"/namespaces/(?P<ns>[a-z0-9-]+)"


class _Handler(BaseHTTPRequestHandler):
    kube: FakeKube
    # Streams are chunked, as the API server sends them: the client yields each chunk as it
    # arrives (a close-delimited body would be read in fixed blocks, hiding events until the end).
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _record(self) -> tuple[str, dict]:
        url = urlparse(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        with self.kube._lock:
            self.kube.requests.append((self.command, url.path, query))
        return url.path, query

    def _json(self, code: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _start_stream(self, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _status(self, code: int, reason: str, message: str) -> None:
        self._json(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason,
                          "message": message, "code": code})

    def _body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        if self.command == "POST":
            self.kube.created.append(copy.deepcopy(body))
        return body

    def do_POST(self) -> None:
        path, _ = self._record()
        if m := re.fullmatch(rf"/apis/batch/v1{_NS}/jobs", path):
            body = self._body()
            if body["metadata"]["name"] in self.kube.jobs:
                return self._status(409, "AlreadyExists", "job exists")
            return self._json(201, self.kube.create_job(m["ns"], body))
        if re.fullmatch(rf"/api/v1{_NS}/services", path):
            body = self._body()
            body["metadata"]["uid"] = "uid-svc"
            self.kube.services[body["metadata"]["name"]] = body
            return self._json(201, body)
        self._status(404, "NotFound", path)

    def do_DELETE(self) -> None:
        path, query = self._record()
        if m := re.fullmatch(rf"/apis/batch/v1{_NS}/jobs/(?P<name>[^/]+)", path):
            found = self.kube.jobs.pop(m["name"], None)
            self.kube.deleted.append(("job", m["name"], {**query, **self._body()}))
        elif m := re.fullmatch(rf"/api/v1{_NS}/services/(?P<name>[^/]+)", path):
            found = self.kube.services.pop(m["name"], None)
            self.kube.deleted.append(("service", m["name"], query))
        else:
            return self._status(404, "NotFound", path)
        if found is None:
            return self._status(404, "NotFound", m["name"])
        if "/services/" in path:  # the API answers a Service deletion with the Service, a Job's with a Status
            return self._json(200, found)
        self._json(200, {"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 200})

    def do_GET(self) -> None:
        path, query = self._record()
        if re.fullmatch(rf"/api/v1{_NS}/pods", path) and query.get("watch") in ("true", "True", "1"):
            return self._watch(query)
        if m := re.fullmatch(rf"/api/v1{_NS}/pods/(?P<pod>[^/]+)/log", path):
            return self._log(m["pod"], query)
        self._status(404, "NotFound", path)

    def _watch(self, query: dict) -> None:
        since = int(query["resourceVersion"]) if query.get("resourceVersion") else None
        limit = min(float(query.get("timeoutSeconds", self.kube.watch_max_s)), self.kube.watch_max_s)
        self._start_stream("application/json")
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            for at, rv, kind, pod in self.kube.watch_events(query.get("labelSelector", ""), since):
                if at > time.monotonic():
                    break  # not yet happened; events are in time order
                try:
                    self._chunk(json.dumps({"type": kind, "object": pod}).encode() + b"\n")
                except OSError:
                    return  # the client has what it wanted and hung up
                since = rv
            time.sleep(0.01)
        self._chunk(b"")

    def _log(self, pod: str, query: dict) -> None:
        lines = self.kube.logs.get(pod)
        if lines is None:
            return self._status(404, "NotFound", pod)
        if query.get("tailLines"):
            lines = lines[-int(query["tailLines"]):]
        self._start_stream("text/plain")
        try:
            for line in lines:
                self._chunk(line.encode() + b"\n")
                if query.get("follow") in ("true", "True"):
                    time.sleep(0.005)
            self._chunk(b"")
        except OSError:
            pass
