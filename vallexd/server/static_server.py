"""The child process that serves cached WAV files read-only over HTTP.

Run as ``python -m vallexd.server.static_server --root DIR --host H --port P --lifeline-fd N``
by `vallexd.server.static_child`.  It replaces the old setup's PHP static server: apps that got an
``audioURL`` download the file from here.

Why a separate process: downloads of large files must never stall the daemon's event
loop or compete with the model thread for the GIL, and a bug here cannot touch the
model or the socket.  It is deliberately stdlib-only (no torch, no aiohttp) so it
starts in milliseconds and stays small.

Safety rules, all enforced below:
* only paths of the cache's shape are served: ``/<2 hex>/<64 hex>.wav`` where the
  folder is the first two digits of the name (see `vallexd.storage.cache`);
* GET and HEAD only, no directory listing;
* never follows a symlink: the folder and the file are opened relative to the root
  fd with ``O_NOFOLLOW``, and the result must be a regular file;
* the child dies with its parent, by two independent means: ``PR_SET_PDEATHSIG``
  (Linux; fires when the parent *thread* exits) and a lifeline pipe whose write end
  only the parent holds (EOF on the read end = the parent is gone, on any OS).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import email.utils
import errno
import os
import re
import signal
import socket
import stat
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

#: The only request paths served: the cache layout `<key[:2]>/<key>.wav`.
PATH_RE = re.compile(r"^/([0-9a-f]{2})/([0-9a-f]{64})\.wav$")
RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
CHUNK = 256 * 1024
PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the Linux kernel to send `sig` when our parent exits; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except OSError:
        return False


def watch_lifeline(fd: int) -> None:
    """Exit the whole process as soon as the parent's end of the pipe closes."""

    def wait() -> None:
        while True:
            try:
                data = os.read(fd, 1)
            except InterruptedError:
                continue
            except OSError:
                data = b""
            if not data:
                # os._exit: no cleanup needed (read-only server) and no thread can block it.
                os._exit(0)

    threading.Thread(target=wait, name="lifeline", daemon=True).start()


class CacheFileHandler(BaseHTTPRequestHandler):
    server_version = "vallexd-static/1"
    sys_version = ""  # do not advertise the Python version
    protocol_version = "HTTP/1.1"
    # A slow or stalled client must not hold a thread forever.
    timeout = 30

    @property
    def root_fd(self) -> int:
        return self.server.root_fd  # type: ignore[attr-defined]

    def do_GET(self) -> None:
        self._serve(send_body=True)

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def _method_not_allowed(self) -> None:
        self._send_error(HTTPStatus.METHOD_NOT_ALLOWED, extra={"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _method_not_allowed

    def _send_error(self, status: HTTPStatus, extra: dict[str, str] | None = None) -> None:
        body = f"{status.value} {status.phrase}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _open(self, path: str) -> int | None:
        """Open the cache file for `path` without following links; None when not servable."""
        match = PATH_RE.match(path)
        if match is None or not match.group(2).startswith(match.group(1)):
            return None
        flags_dir = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            dir_fd = os.open(match.group(1), flags_dir, dir_fd=self.root_fd)
        except OSError:
            return None
        try:
            fd = os.open(
                match.group(2) + ".wav",
                os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                dir_fd=dir_fd,
            )
        except OSError:
            return None
        finally:
            os.close(dir_fd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            # O_NONBLOCK above keeps a FIFO planted in the cache from blocking this open.
            os.close(fd)
            return None
        os.set_blocking(fd, True)
        return fd

    def _serve(self, *, send_body: bool) -> None:
        path = self.path.split("?", 1)[0].split("#", 1)[0]
        fd = self._open(path)
        if fd is None:
            self._send_error(HTTPStatus.NOT_FOUND)
            return
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            size = st.st_size
            start, end = 0, size - 1
            status = HTTPStatus.OK
            header = self.headers.get("Range")
            if header is not None:
                parsed = parse_range(header, size)
                if parsed == "unsatisfiable":
                    self._send_error(
                        HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, extra={"Content-Range": f"bytes */{size}"}
                    )
                    return
                if parsed is not None:
                    start, end = parsed
                    status = HTTPStatus.PARTIAL_CONTENT
            length = max(0, end - start + 1)
            self.send_response(status)
            self.send_header("Content-Type", "audio/wav")
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True))
            # `fresh: true` can replace an entry in place, so clients must revalidate.
            self.send_header("Cache-Control", "no-cache")
            self.send_header("X-Content-Type-Options", "nosniff")
            if status == HTTPStatus.PARTIAL_CONTENT:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if not send_body:
                return
            f.seek(start)
            remaining = length
            while remaining > 0:
                chunk = f.read(min(CHUNK, remaining))
                if not chunk:
                    break  # file shrank under us (pruned); the client sees a short body
                self.wfile.write(chunk)
                remaining -= len(chunk)

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(f"vallexd-static: {self.address_string()} {format % args}\n")


def parse_range(header: str, size: int) -> tuple[int, int] | str | None:
    """One ``bytes=a-b`` range → (start, end) inclusive; None = ignore; "unsatisfiable" → 416.

    Multi-range requests are answered with the whole file, which RFC 9110 allows.
    """
    match = RANGE_RE.match(header.strip())
    if match is None:
        return None
    first, last = match.group(1), match.group(2)
    if not first and not last:
        return None
    if not first:  # suffix range: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - n), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if start >= size:
        return "unsatisfiable"
    if end < start:
        return None
    return start, min(end, size - 1)


class CacheServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str, port: int, root: str) -> None:
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        super().__init__((host.strip("[]"), port), CacheFileHandler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vallexd.server.static_server",
                                     description="Serve vallexd's cached WAV files read-only.")
    parser.add_argument("--root", required=True, help="the cache folder to serve")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument("--lifeline-fd", type=int, default=None,
                        help="read end of the parent's lifeline pipe (EOF = parent gone: exit)")
    args = parser.parse_args(argv)

    set_parent_death_signal()
    if args.lifeline_fd is not None:
        watch_lifeline(args.lifeline_fd)
    # The supervisor stops us with SIGTERM; exit at once (nothing to flush).
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    # Ctrl-C in a terminal reaches the whole process group; the daemon decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        server = CacheServer(args.host, args.port, args.root)
    except OSError as exc:
        reason = errno.errorcode.get(exc.errno or 0, "")
        print(f"vallexd-static: cannot serve {args.root} on {args.host}:{args.port}: {exc} {reason}".rstrip(),
              file=sys.stderr, flush=True)
        return 1
    port = server.server_address[1]
    # The supervisor waits for this exact line to learn the port (we may have been given 0).
    print(f"READY port={port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
