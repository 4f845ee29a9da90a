"""A fake Qdrant REST server for tests of the server path under failure: stdlib ``http.server`` on
127.0.0.1 (an ephemeral port, in a thread), answering the endpoints ``ServerStore`` calls from an
in-memory table of points, with scripted failures in front of them.

    with FakeQdrant() as fake:
        fake.add_collection("docs", 4)
        fake.fail("PUT", "/collections/docs/points", Reply(503), Reply(503))  # the next two upserts
        store = ServerStore(QdrantConfig(url=fake.url))

A scripted failure is used once, in order, by the next request whose method and path (query string
left out) match; requests with none left get the normal answer. ``fake.requests`` records every
request (method, path, headers) for the tests to read. Only what the jobs use is implemented: no
vectors search, and filters are the writer's stale-chunk filter (``doc_id`` match, ``chunk_index`` >=).
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclasses.dataclass
class Reply:
    """A scripted answer: ``status`` with ``body`` (JSON; Qdrant's error shape for ``error``) and ``headers``.

    ``close``: send half of the headers, then close the connection (a server that died mid-response).
    ``delay_s``: wait this long first (a server slower than the client's timeout); the request is then
    served normally when ``status`` is 0.
    """

    status: int = 0
    error: str | None = None
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    close: bool = False
    delay_s: float = 0.0
    apply: bool = False  # serve the request normally (the server applied it), then answer with ``status``


class FakeQdrant:
    def __init__(self, api_key: str | None = None) -> None:
        self.api_key = api_key
        self.collections: dict[str, dict[str, Any]] = {}  # name -> {"size": n, "points": {id: point}}
        self.aliases: dict[str, str] = {}
        self.script: list[tuple[str, str, Reply]] = []
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _serve(self) -> None:
                fake._handle(self)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeQdrant:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- set-up ----------------------------------------------------------------------------
    def add_collection(self, name: str, size: int) -> None:
        self.collections[name] = {"size": size, "points": {}}

    def fail(self, method: str, path: str, *replies: Reply) -> None:
        """Answer the next ``len(replies)`` requests ``method path`` (a regex, whole path) with ``replies``."""
        with self.lock:
            self.script.extend((method, path, r) for r in replies)

    def calls(self, method: str, path: str) -> int:
        return sum(1 for m, p, _ in self.requests if m == method and re.fullmatch(path, p))

    # -- serving ---------------------------------------------------------------------------
    def _scripted(self, method: str, path: str) -> Reply | None:
        with self.lock:
            for i, (m, p, reply) in enumerate(self.script):
                if m == method and re.fullmatch(p, path):
                    del self.script[i]
                    return reply
        return None

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        path = h.path.split("?", 1)[0]
        self.requests.append((h.command, path, dict(h.headers.items())))
        reply = self._scripted(h.command, path)
        if reply is not None and reply.delay_s:
            time.sleep(reply.delay_s)
        if reply is not None and reply.close:
            h.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n{\"res")
            h.wfile.flush()
            h.close_connection = True
            return
        if self.api_key is not None and h.headers.get("api-key") != self.api_key and path != "/":
            self._send(h, 401, {"status": {"error": "Invalid api-key"}})
            return
        if reply is not None and reply.status and not reply.apply:
            self._send(h, reply.status, {"status": {"error": reply.error}} if reply.error else {}, reply.headers)
            return
        if path == "/":  # the version check: Qdrant answers it without the result envelope
            self._send(h, 200, {"title": "qdrant - vector search engine", "version": "1.20.0"})
            return
        try:
            result = self._route(h.command, path, json.loads(raw) if raw else None)
        except KeyError as exc:
            self._send(h, 404, {"status": {"error": f"Not found: {exc.args[0]}"}})
            return
        if reply is not None and reply.status:  # applied, then the answer is lost
            self._send(h, reply.status, {"status": {"error": reply.error}} if reply.error else {}, reply.headers)
            return
        self._send(h, 200, {"result": result, "status": "ok", "time": 0.0})

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    def _collection(self, name: str) -> dict[str, Any]:
        name = self.aliases.get(name, name)
        if name not in self.collections:
            raise KeyError(f"Collection `{name}` doesn't exist!")
        return self.collections[name]

    def _route(self, method: str, path: str, body: Any) -> Any:
        parts = path.strip("/").split("/")
        if parts == ["collections"]:
            return {"collections": [{"name": n} for n in sorted(self.collections)]}
        if parts == ["aliases"]:
            return {"aliases": [{"alias_name": a, "collection_name": c} for a, c in sorted(self.aliases.items())]}
        if parts[0] != "collections" or len(parts) < 2:
            raise KeyError(path)
        name, rest = parts[1], parts[2:]
        if rest == ["exists"] and method == "GET":
            return {"exists": name in self.collections or name in self.aliases}
        if rest == [] and method == "GET":
            return _collection_info(self._collection(name)["size"], len(self._collection(name)["points"]))
        if rest == [] and method == "DELETE":
            return self.collections.pop(name, None) is not None
        if rest == [] and method == "PUT":
            self.add_collection(name, body["vectors"]["size"])
            return True
        if rest == ["index"]:
            return {"operation_id": 0, "status": "completed"}
        points = self._collection(name)["points"]
        if rest == ["points"] and method == "PUT":
            for p in body["points"]:
                points[str(p["id"])] = {"id": str(p["id"]), "vector": p["vector"], "payload": p.get("payload") or {}}
            return {"operation_id": 0, "status": "completed"}
        if rest == ["points"] and method == "POST":
            return [_record(points[str(i)], body) for i in body["ids"] if str(i) in points]
        if rest == ["points", "delete"]:
            for pid in [pid for pid, p in points.items() if _matches(p["payload"], body["filter"])]:
                del points[pid]
            return {"operation_id": 0, "status": "completed"}
        if rest == ["points", "count"]:
            return {"count": len(points)}
        if rest == ["points", "scroll"]:
            ordered = sorted(points)
            start = ordered.index(str(body["offset"])) if body.get("offset") else 0
            page = ordered[start : start + body.get("limit", 10)]
            after = ordered[start + len(page)] if start + len(page) < len(ordered) else None
            return {"points": [_record(points[i], body) for i in page], "next_page_offset": after}
        raise KeyError(path)


def _record(point: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    return {"id": point["id"], "payload": point["payload"] if body.get("with_payload", True) else None,
            "vector": point["vector"] if body.get("with_vector") or body.get("with_vectors") else None}  # fmt: skip


def _matches(payload: dict[str, Any], flt: dict[str, Any]) -> bool:
    """The writer's stale-chunk filter: ``should`` of ``must`` [doc_id match, chunk_index range gte]."""

    def must(f: dict[str, Any]) -> bool:
        for c in f.get("must") or []:
            value = payload.get(c["key"])
            if c.get("match") is not None and value != c["match"]["value"]:
                return False
            if c.get("range") is not None and not (value is not None and value >= c["range"]["gte"]):
                return False
        return True

    should = flt.get("should")
    return any(must(f) for f in should) if should else must(flt)


def _collection_info(size: int, n: int) -> dict[str, Any]:
    """A collection's info as a server gives it: built by qdrant-client's local mode, which has the same model."""
    from qdrant_client import QdrantClient, models

    client = QdrantClient(":memory:")
    client.create_collection("c", vectors_config=models.VectorParams(size=size, distance=models.Distance.COSINE))
    info = client.get_collection("c").model_dump(mode="json", exclude_none=True)
    client.close()
    info["points_count"] = n
    return info
