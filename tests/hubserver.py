"""A fake Hugging Face Hub on 127.0.0.1 that speaks the routes huggingface_hub calls.

API: /api/models?search=, /api/models/{repo}[/revision/{rev}] (siblings with size and LFS sha256),
/api/models/{repo}/tree/{rev}. Files: HEAD/GET /{repo}/resolve/{rev}/{file} with X-Repo-Commit, ETag,
X-Linked-Etag, X-Linked-Size, Content-Length and Range support. Failure modes are switched per test:
`drop_after` closes the connection mid-file on the first GET, `corrupt` flips a byte in what is served.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class HubFile:
    path: Path
    sha256: str
    size: int


@dataclass
class FakeHub:
    """Repos, files and recorded requests; set drop_after/corrupt to make downloads fail."""

    repos: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    tags: dict[str, list[str]] = field(default_factory=dict)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    drop_after: int | None = None
    corrupt: bool = False
    url: str = ""

    def add(self, repo: str, name: str, path: Path, *, tags: list[str] | None = None) -> HubFile:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        entry = HubFile(path, digest, path.stat().st_size)
        self.repos.setdefault(repo, {})[name] = entry
        self.tags[repo] = tags or ["gguf"]
        return entry

    def ranges(self) -> list[str]:
        return [h["range"] for method, _, h in self.requests if method == "GET" and "range" in h]


def _model_json(hub: FakeHub, repo: str) -> dict:
    siblings = [
        {
            "rfilename": name,
            "size": f.size,
            "blobId": f.sha256[:40],
            "lfs": {"sha256": f.sha256, "size": f.size, "pointerSize": 134},
        }
        for name, f in hub.repos[repo].items()
    ]
    return {"id": repo, "sha": COMMIT, "downloads": 1234, "likes": 56, "tags": hub.tags[repo], "siblings": siblings}


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass

    def _json(self, body: object, status: int = 200, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _not_found(self) -> None:
        self._json({"error": "Repository not found"}, 404, {"X-Error-Code": "RepoNotFound"})

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, *, head: bool) -> None:
        hub = self.hub
        hub.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        if parts[:2] == ["api", "models"] and len(parts) == 2:
            query = parse_qs(url.query).get("search", [""])[0].lower()
            found = [_model_json(hub, r) for r in hub.repos if query in r.lower()]
            return self._json([{k: v for k, v in m.items() if k != "siblings"} for m in found])
        if parts[:2] == ["api", "models"]:
            repo = "/".join(parts[2:4])
            if repo not in hub.repos:
                return self._not_found()
            if len(parts) > 4 and parts[4] == "tree":
                tree = [
                    {
                        "type": "file",
                        "path": e["rfilename"],
                        "size": e["size"],
                        "oid": e["blobId"],
                        "lfs": {"oid": e["lfs"]["sha256"], "size": e["size"], "pointerSize": 134},
                    }
                    for e in _model_json(hub, repo)["siblings"]
                ]
                return self._json(tree)
            return self._json(_model_json(hub, repo))
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, name = "/".join(parts[:2]), "/".join(parts[4:])
            entry = hub.repos.get(repo, {}).get(name)
            if entry is None:
                return self._json({"error": "Entry not found"}, 404, {"X-Error-Code": "EntryNotFound"})
            return self._file(entry, head=head)
        self._not_found()

    def _file(self, entry: HubFile, *, head: bool) -> None:
        start = 0
        header = self.headers.get("Range")
        if header and header.startswith("bytes="):
            start = int(header[len("bytes=") :].split("-")[0])
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(entry.size - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{entry.size - 1}/{entry.size}")
        for key, value in {
            "Accept-Ranges": "bytes",
            "ETag": f'"{entry.sha256}"',
            "X-Linked-Etag": f'"{entry.sha256}"',
            "X-Linked-Size": str(entry.size),
            "X-Repo-Commit": COMMIT,
        }.items():
            self.send_header(key, value)
        self.end_headers()
        if head:
            return
        drop_at = self.hub.drop_after if start == 0 else None
        self.hub.drop_after = None if drop_at is not None else self.hub.drop_after
        self._stream(entry, start, drop_at)

    def _stream(self, entry: HubFile, start: int, drop_at: int | None) -> None:
        sent = start
        with entry.path.open("rb") as handle:
            handle.seek(start)
            while chunk := handle.read(1 << 20):
                if drop_at is not None and sent + len(chunk) > drop_at:
                    self.wfile.write(chunk[: drop_at - sent])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)  # the client sees a short body
                    return
                if self.hub.corrupt and sent == 0:
                    chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                self.wfile.write(chunk)
                sent += len(chunk)


class HubServer:
    """Run a FakeHub on a free port in a daemon thread (use as a context manager)."""

    def __init__(self, hub: FakeHub) -> None:
        handler = type("Handler", (_Handler,), {"hub": hub})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        hub.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.hub = hub
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self.hub

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
