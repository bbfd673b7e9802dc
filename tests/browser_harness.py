"""A tiny headless-Chromium driver for the page test: the DevTools protocol over a pipe, stdlib only.

Chromium started with ``--remote-debugging-pipe`` reads DevTools commands (JSON, each followed by a NUL byte) from
file descriptor 3 and writes replies and events to descriptor 4; no port, no websocket, no extra package. The
page test uses it to load the audit page, collect console messages, exceptions, log entries (CSP violations land
there) and every network request, drive the epoch slider, and take a screenshot.

Find the browser with :func:`find_chromium` (``$CHROMIUM``, then ``chromium``, ``chromium-browser``,
``google-chrome``). As a script it renders a page to a PNG (used for ``docs/report-screenshot.png``)::

    python tests/browser_harness.py audit.html docs/report-screenshot.png [--width 1200 --height 900] [--colors 256]

Example:
    >>> with Browser() as b:  # doctest: +SKIP
    ...     b.open("file:///tmp/audit.html")
    ...     b.evaluate("document.title")
    'Saliency audit: TinyConvNet'
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable, or None."""
    env = os.environ.get("CHROMIUM")
    if env:
        return env if Path(env).exists() else shutil.which(env)
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


class BrowserError(RuntimeError):
    pass


class Browser:
    """One headless Chromium with one attached page; collects console, log, exception and network events."""

    def __init__(self, executable: str | None = None, width: int = 1200, height: int = 900, timeout: float = 30.0):
        self.executable = executable or find_chromium()
        if not self.executable:
            raise BrowserError("no chromium found: apt-get install chromium (or set $CHROMIUM)")
        self.width, self.height, self.timeout = width, height, timeout
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []
        self.session: str | None = None

    # -- process -----------------------------------------------------------------------------------------
    def __enter__(self) -> Browser:
        self.profile = tempfile.mkdtemp(prefix="ls-chromium-")
        to_child_r, self._w = os.pipe()
        self._r, from_child_w = os.pipe()

        def wire() -> None:  # in the child: the protocol pipes on fds 3 and 4
            os.dup2(to_child_r, 3)
            os.dup2(from_child_w, 4)

        args = [
            self.executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-extensions", "--disable-dev-shm-usage", "--mute-audio",
            "--hide-scrollbars", f"--user-data-dir={self.profile}", "--remote-debugging-pipe",
            f"--window-size={self.width},{self.height}", "about:blank",
        ]
        # stderr to a file, not a pipe: chromium's chatter must never block it on a full pipe
        self._log = open(Path(self.profile) / "chromium.log", "wb")  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(args, preexec_fn=wire, pass_fds=(3, 4), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self._log)
        os.close(to_child_r)
        os.close(from_child_w)
        try:
            targets = self.call("Target.getTargets")["targetInfos"]
            page = next(t for t in targets if t["type"] == "page")
            self.session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
            for domain in ("Page", "Runtime", "Log", "Network"):
                self.call(f"{domain}.enable")
            self.call("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height,
                      deviceScaleFactor=1, mobile=False)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if self.proc.poll() is None:
                try:
                    self.session = None
                    self._send("Browser.close", {})
                    self.proc.wait(5)
                except Exception:  # noqa: BLE001 - fall through to kill
                    pass
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)
        finally:
            for fd in (self._w, self._r):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._log.close()
            shutil.rmtree(self.profile, ignore_errors=True)

    # -- protocol ----------------------------------------------------------------------------------------
    def _send(self, method: str, params: dict) -> int:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        return self._id

    def _recv(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError("timed out waiting for chromium")
            ready, _, _ = select.select([self._r], [], [], left)
            if ready:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    log = Path(self.profile) / "chromium.log"
                    err = log.read_bytes()[-2000:].decode(errors="replace") if log.exists() else ""
                    raise BrowserError(f"chromium closed the DevTools pipe: {err}")
                self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, **params: Any) -> dict:
        """Send one command and return its result; events arriving meanwhile are kept in :attr:`events`."""
        mid = self._send(method, params)
        deadline = time.monotonic() + self.timeout
        while True:
            msg = self._recv(deadline)
            if msg.get("id") == mid:
                if "error" in msg:
                    raise BrowserError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def wait_event(self, method: str, timeout: float | None = None) -> dict:
        """Wait for (or find already received) the event ``method``."""
        for ev in self.events:
            if ev["method"] == method and not ev.get("_seen"):
                ev["_seen"] = True
                return ev
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            msg = self._recv(deadline)
            if "method" in msg:
                self.events.append(msg)
                if msg["method"] == method:
                    msg["_seen"] = True
                    return msg

    # -- helpers -----------------------------------------------------------------------------------------
    def open(self, url: str) -> None:
        """Navigate and wait for the load event (scripts ran, images decoded)."""
        result = self.call("Page.navigate", url=url)
        if result.get("errorText"):
            raise BrowserError(f"navigation to {url} failed: {result['errorText']}")
        self.wait_event("Page.loadEventFired")
        self.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))", await_promise=True)

    def evaluate(self, expression: str, await_promise: bool = False) -> Any:
        """Evaluate JavaScript in the page and return its JSON value; a thrown exception is a BrowserError."""
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=await_promise)
        if "exceptionDetails" in r:
            raise BrowserError(f"{expression!r} threw: {r['exceptionDetails']}")
        return r["result"].get("value")

    def screenshot(self, path: str | os.PathLike, full_page: bool = False) -> Path:
        """Write a PNG of the viewport (or the whole page) to ``path``."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            params["captureBeyondViewport"] = True
        data = base64.b64decode(self.call("Page.captureScreenshot", **params)["data"])
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def problems(self) -> list[str]:
        """Console errors/warnings, uncaught exceptions and log entries (CSP violations, failed loads)."""
        out = []
        for ev in self.events:
            m, p = ev["method"], ev.get("params", {})
            if m == "Runtime.exceptionThrown":
                out.append(f"exception: {p.get('exceptionDetails', {}).get('text')} {p.get('exceptionDetails')}")
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning", "assert"):
                out.append(f"console.{p['type']}: {[a.get('value') for a in p.get('args', [])]}")
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") in ("error", "warning"):
                out.append(f"log {p['entry']['level']}: {p['entry'].get('text')} {p['entry'].get('url', '')}")
            elif m == "Network.loadingFailed" and not p.get("canceled"):
                out.append(f"loading failed: {p.get('errorText')} {p.get('blockedReason', '')}")
        return out

    def requests(self) -> list[str]:
        """URLs of every request the page made (Network.requestWillBeSent)."""
        return [ev["params"]["request"]["url"] for ev in self.events if ev["method"] == "Network.requestWillBeSent"]


def screenshot(html: str | os.PathLike, png: str | os.PathLike, width: int = 1200, height: int = 900) -> Path:
    """Render ``html`` in headless Chromium and save a ``width x height`` screenshot to ``png``."""
    with Browser(width=width, height=height) as b:
        b.open(Path(html).resolve().as_uri())
        return b.screenshot(png)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("html")
    ap.add_argument("png")
    ap.add_argument("--width", type=int, default=1200)
    ap.add_argument("--height", type=int, default=900)
    ap.add_argument("--colors", type=int, default=0, help="quantize to this many colors (smaller file)")
    a = ap.parse_args()
    out = screenshot(a.html, a.png, a.width, a.height)
    if a.colors:
        from PIL import Image

        Image.open(out).convert("RGB").quantize(colors=a.colors, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    print(f"{out} ({out.stat().st_size / 1e3:.0f} kB)")
    sys.exit(0)
