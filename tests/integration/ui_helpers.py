"""Helpers for the browser test: a small materialised instance, the webserver, headless Chromium.

Chromium (/usr/bin/chromium, Debian's package) runs as a subprocess driven over the Chrome
DevTools protocol: no Python browser package and no browser download. Every process started here
runs in its own process group and is stopped with it.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Self

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CHROMIUM = Path("/usr/bin/chromium")

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
    "--window-size=1600,1000",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop_group(process: subprocess.Popen, grace_s: float = 20) -> None:
    """SIGTERM the process group we started (start_new_session), SIGKILL it if it lingers."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            pass
    try:  # children of an exited leader may still hold the group
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


# --- the webserver ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Webserver:
    base_url: str
    log: Path

    def get_json(self, path: str) -> dict:
        with urllib.request.urlopen(self.base_url + path, timeout=10) as response:
            return json.loads(response.read())

    def graphql(self, query: str, variables: Mapping | None = None) -> dict:
        body = json.dumps({"query": query, "variables": dict(variables or {})}).encode()
        request = urllib.request.Request(
            self.base_url + "/graphql", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            payload = json.loads(response.read())
        if "errors" in payload:
            raise RuntimeError(f"GraphQL errors: {payload['errors']}")
        return payload["data"]


_LOCATION_QUERY = """{ workspaceOrError { ... on Workspace { locationEntries {
  name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }"""


@contextmanager
def dagster_webserver(env: Mapping[str, str], log_dir: Path, timeout_s: float = 150) -> Iterator[Webserver]:
    """`dagster-webserver -w workspace.yaml` on 127.0.0.1:<free port>, yielded once /server_info
    answers and the code location has loaded; the whole process group is stopped on exit."""
    port = free_port()
    log = log_dir / "webserver.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), "-w", "workspace.yaml"],
            cwd=REPO,
            env=dict(env),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Webserver(f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"dagster-webserver exited ({process.returncode}):\n{_tail(log)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"dagster-webserver not ready after {timeout_s} s:\n{_tail(log)}")
            try:
                server.get_json("/server_info")
                entries = server.graphql(_LOCATION_QUERY)["workspaceOrError"]["locationEntries"]
            except (OSError, RuntimeError, ValueError):
                entries = []
            if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                errors = [e for e in entries if e["locationOrLoadError"]["__typename"] == "PythonError"]
                if errors:
                    raise RuntimeError(f"code location failed to load: {errors}")
                break
            time.sleep(1)
        yield server
    finally:
        _stop_group(process)


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


# --- headless Chromium over the DevTools protocol -----------------------------------------------


def chromium_available() -> bool:
    return CHROMIUM.exists() and os.access(CHROMIUM, os.X_OK)


class Browser:
    """One headless Chromium in a throw-away profile, driven over the Chrome DevTools protocol.

    `--dump-dom` cannot click, and the UI shows markdown metadata (the PCA map) only after a click
    on "Show Markdown", so the page is driven over CDP's websocket (`websockets` comes with
    dagster-webserver through uvicorn[standard]). Waits poll the live DOM in real time.
    """

    def __init__(self, timeout_s: float = 30) -> None:
        self.timeout_s = timeout_s
        self._profile = Path(tempfile.mkdtemp(prefix="majortom-chromium-"))
        self._log = self._profile / "chromium.log"  # a file, not a pipe nobody drains
        with self._log.open("wb") as log:
            self._process = subprocess.Popen(
                [
                    str(CHROMIUM),
                    *CHROMIUM_FLAGS,
                    f"--user-data-dir={self._profile}",
                    "--remote-debugging-address=127.0.0.1",
                    "--remote-debugging-port=0",
                    "about:blank",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._ids = 0
        self._socket = None
        try:
            self._socket = self._connect()
        except BaseException:
            self.close()
            raise

    def _connect(self):
        from websockets.sync.client import connect

        port_file = self._profile / "DevToolsActivePort"  # Chromium writes "<port>\n<path>" here
        deadline = time.monotonic() + self.timeout_s
        while not port_file.exists() or not port_file.read_text().strip():
            if self._process.poll() is not None:
                raise RuntimeError(f"chromium exited ({self._process.returncode}):\n{_tail(self._log)}")
            if time.monotonic() > deadline:
                raise TimeoutError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            targets = json.loads(response.read())
        page = next(t for t in targets if t["type"] == "page")
        return connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=10)

    def send(self, method: str, **params) -> dict:
        """One CDP command; events arriving meanwhile are dropped (nothing here subscribes)."""
        self._ids += 1
        self._socket.send(json.dumps({"id": self._ids, "method": method, "params": params}))
        while True:
            message = json.loads(self._socket.recv(timeout=self.timeout_s + 30))
            if message.get("id") == self._ids:
                if "error" in message:
                    raise RuntimeError(f"CDP {method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str, timeout_s: float | None = None):
        """Poll a JS expression until it is truthy; the error says what never appeared."""
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                text = self.evaluate("document.body ? document.body.innerText : ''") or ""
                raise TimeoutError(
                    f"{what} did not appear at {self.evaluate('location.href')}; page text: {text[:1500]!r}"
                )
            time.sleep(0.25)

    def goto(self, url: str, *ready_texts: str) -> Page:
        """Load `url` and return the rendered page once every one of `ready_texts` is visible,
        whitespace collapsed as in `Page.text` (the UI fills its sections from separate queries,
        so one text does not mean all)."""
        self.send("Page.navigate", url=url)
        wanted = json.dumps(list(ready_texts))
        self.wait_for(
            f"document.body && (s => {wanted}.every(t => s.includes(t)))"
            "(document.body.innerText.replace(/\\s+/g, ' '))",
            f"all of {list(ready_texts)}",
        )
        return self.page()

    def click(self, element_js: str, what: str) -> None:
        """A real mouse click (press + release) at the centre of the element `element_js` finds."""
        box = self.wait_for(
            f"(() => {{ const e = {element_js}; if (!e) return null;"
            " e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
            " return r.width ? [r.x + r.width / 2, r.y + r.height / 2] : null; })()",
            what,
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def page(self) -> Page:
        html = self.evaluate("document.documentElement.outerHTML")
        return parse_page(self.evaluate("location.href"), html)

    def screenshot(self, png: Path) -> Path:
        data = self.send("Page.captureScreenshot", format="png")["data"]
        png.write_bytes(base64.b64decode(data))
        return png

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
        _stop_group(self._process, grace_s=5)
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- reading the rendered DOM ----------------------------------------------------------------


class _PageText(HTMLParser):
    """Visible text (scripts and styles dropped), table rows (cell texts) and <img> attributes."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.chunks: list[str] = []
        self.rows: list[list[str]] = []
        self.images: list[dict[str, str]] = []
        self._skip = 0
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style", "noscript"):
            self._skip += 1
        elif tag == "img":
            self.images.append({k: v or "" for k, v in attrs})
        elif tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th") and self.rows:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("script", "style", "noscript") and self._skip:
            self._skip -= 1
        elif tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append(" ".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._skip or not data.strip():
            return
        self.chunks.append(data.strip())
        if self._cell is not None:
            self._cell.append(data.strip())


@dataclass(frozen=True)
class Page:
    url: str
    html: str
    text: str  # visible text, whitespace collapsed
    rows: list[list[str]]  # every table row's cell texts, in document order
    images: list[dict[str, str]]

    def has(self, text: str) -> bool:
        return text in self.text

    def table(self, key_column: int = 0, value_column: int = -1) -> dict[str, str]:
        """Rows of the page's tables as key -> value (e.g. Key | Timestamp | Value metadata tables)."""
        return {r[key_column]: r[value_column] for r in self.rows if len(r) > max(key_column, value_column)}

    def section(self, start: str, end: str) -> str:
        """Visible text between two headings (e.g. "Upstream assets" and "Downstream assets")."""
        _, found, rest = self.text.partition(start)
        if not found:
            raise AssertionError(f"{start!r} not on {self.url}")
        return rest.partition(end)[0]


def parse_page(url: str, html: str) -> Page:
    parser = _PageText()
    parser.feed(html)
    parser.close()
    return Page(url, html, re.sub(r"\s+", " ", " ".join(parser.chunks)), parser.rows, parser.images)


# --- a small materialised instance -----------------------------------------------------------

MODEL = "dinov2-rgb"
SOURCE = "S2L2A"
IMAGE_SIZE = 384  # a reduced Core image: 4 fragments of 224 px per sample instead of 36
ROW = "195D"
CELLS = ("195D_1911L", "195D_0R", "195D_1910R")  # both ends of the row (next to +-180 degrees) and lon 0


def runtime_env(home: Path, dagster_home: Path) -> dict[str, str]:
    """The environment the webserver's code location reads its settings from."""
    from dagster_helpers import local_env

    return local_env(home, dagster_home, MODEL, IMAGE_SIZE)


def materialise_small_graph(root: Path) -> tuple[Path, Path]:
    """Synthetic Core-S2L2A (one row, two cells, 384 px), then core metadata -> shards ->
    fragments -> DINOv2 embeddings (with checks) -> PCA map into a persistent DAGSTER_HOME."""
    import dagster as dg
    from dagster_helpers import local_resources, materialize, pipeline_assets

    from majortom_assets import synthetic
    from majortom_assets.defs import keys
    from majortom_assets.demo import prepare_dagster_home

    home = root / "home"
    synthetic.generate_collection(
        home / "collections" / f"Core-{SOURCE}", SOURCE, cells=list(CELLS), size=IMAGE_SIZE, seed=5
    )
    dagster_home = prepare_dagster_home(root / "dagster_home")
    assets = pipeline_assets(SOURCE, MODEL)
    resources = local_resources(home, MODEL, IMAGE_SIZE)
    row_keys = [keys.core_shards_key(SOURCE), keys.fragments_key(224), keys.embeddings_key(MODEL)]
    steps = (
        ([keys.core_metadata_key(SOURCE)], None),
        (dg.AssetSelection.assets(*row_keys) | dg.AssetSelection.checks_for_assets(*row_keys), ROW),
        ([keys.pca_map_key(MODEL)], None),
    )
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        for selection, partition in steps:
            if not materialize(assets, resources, instance, selection, partition).success:
                raise RuntimeError(f"materialising {selection} ({partition}) failed")
    return home, dagster_home


# --- Dagster UI specifics --------------------------------------------------------------------


def show_markdown(browser: Browser, key: str, timeout_s: float = 15) -> Page:
    """Click the "[Show Markdown]" link of metadata entry `key` (how the UI shows markdown values)
    and return the dialog that opens, once its images (if any) have decoded."""
    row = (
        "Array.from(document.querySelectorAll('tr'))"
        f".find(r => r.cells[0] && r.cells[0].innerText.trim() === {json.dumps(key)})"
    )
    browser.click(f"{row}?.querySelector('a')", f"[Show Markdown] of metadata entry {key!r}")
    dialog = "document.querySelector('[role=dialog]')"
    browser.wait_for(
        f"{dialog} && Array.from({dialog}.querySelectorAll('img')).every(i => i.complete)"
        f" && {dialog}.innerText.trim().length > 0",
        f"markdown dialog of {key!r}",
        timeout_s,
    )
    return parse_page(browser.evaluate("location.href"), browser.evaluate(f"{dialog}.outerHTML"))
