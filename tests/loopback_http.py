"""A real HTTP file server on 127.0.0.1 for download tests (http.server in a thread).

It serves a folder read-only and can misbehave on purpose, the way real
servers and networks do:

- `ranges=False`: ignore `Range` headers and always send the whole file (200);
- `drop[path] = (n, count)`: for the next `count` requests of `path`, announce the
  full length but send only `n` bytes, then cut the connection.

Every request is logged as (path, Range header or None) so tests can check
that a resume really asked for the missing bytes only.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RANGE = re.compile(r"^bytes=(\d+)-$")


class FileServer:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.ranges = True
        self.drop: dict[str, tuple[int, int]] = {}
        self.log: list[tuple[str, str | None]] = []
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"files": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> FileServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)

    def requests_for(self, path: str) -> list[str | None]:
        """Range headers of the requests made for `path` (None = no Range)."""
        return [rng for p, rng in self.log if p == path]

    def _take_drop(self, path: str) -> int | None:
        with self._lock:
            if path not in self.drop:
                return None
            n, count = self.drop[path]
            if count <= 1:
                del self.drop[path]
            else:
                self.drop[path] = (n, count - 1)
            return n


class _Handler(BaseHTTPRequestHandler):
    files: FileServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output quiet: the server records requests in FileServer.log instead."""

    def do_GET(self) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        rng = self.headers.get("Range")
        self.files.log.append((path, rng))
        target = (self.files.root / path.lstrip("/")).resolve()
        if not target.is_relative_to(self.files.root) or not target.is_file():
            self._send_simple(404, b"not found")
            return
        data = target.read_bytes()
        etag = f'"{hashlib.sha256(data).hexdigest()[:16]}"'
        start = 0
        match = _RANGE.match(rng or "")
        if_range = self.headers.get("If-Range")
        if if_range is not None and if_range != etag:
            match = None  # RFC 9110: the resource changed, so the Range is ignored: send it whole
        if match and self.files.ranges:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("ETag", etag)
        if self.files.ranges:
            self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        cut = self.files._take_drop(path)
        if cut is not None:
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            # Cut the TCP connection mid-body, as a network failure would.
            with contextlib.suppress(OSError):
                self.connection.shutdown(2)
            return
        self.wfile.write(body)

    def _send_simple(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@contextlib.contextmanager
def serving(root: Path) -> Iterator[FileServer]:
    server = FileServer(root).start()
    try:
        yield server
    finally:
        server.stop()
