"""Local HTTP servers for remote-source tests (127.0.0.1 only, bounded, stopped by the test).

``serve_directory`` answers GET/HEAD with Range support (what fsspec's HTTP filesystem and
pyarrow need to read Parquet by byte range) and checks HTTP Basic credentials, so a test proves
the credentials in a collection URL are really used — and then that they are shown nowhere.
``stalling_server`` accepts connections and never answers.
"""

from __future__ import annotations

import base64
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@contextmanager
def serve_directory(root: Path, user: str, password: str, fail_prefix: str | None = None) -> Iterator[int]:
    """Serve ``root`` on a free port; requests under ``fail_prefix`` get HTTP 500."""
    expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def _target(self) -> Path | None:
            if self.headers.get("Authorization") != expected:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="core"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            rel = self.path.split("?", 1)[0].lstrip("/")
            if fail_prefix is not None and rel.startswith(fail_prefix):
                self.send_response(500)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            path = (root / rel).resolve()
            if root.resolve() not in path.parents or not path.is_file():
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            return path

        def _answer(self, body: bool) -> None:
            path = self._target()
            if path is None:
                return
            data = path.read_bytes()
            start, end = 0, len(data) - 1
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes="):
                first, _, last = rng[6:].partition("-")
                if first:
                    start, end = int(first), min(int(last) if last else end, end)
                else:
                    start = max(0, len(data) - int(last))
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            else:
                self.send_response(200)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(end - start + 1))
            self.end_headers()
            if body:
                self.wfile.write(data[start:end + 1])

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def stalling_server() -> Iterator[int]:
    """A port that accepts TCP connections and never sends a byte."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=2)
        for conn in held:
            conn.close()
        srv.close()
