"""A tiny W3C WebDriver client for headless Chromium, standard library only.

Starts ``chromedriver`` on a free localhost port, opens one session and talks
to it over HTTP with urllib + json. Used by tests/test_report.py and
docs/make_report_screenshot.py. Needs the Debian packages ``chromium`` and
``chromium-driver`` (``apt-get install chromium chromium-driver``).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
INSTALL_HINT = "apt-get install chromium chromium-driver"
ELEMENT_KEY = "element-6066-11e4-a52e-4f735466cecf"  # W3C WebDriver's key for an element reference
# Special keys for send_keys; "select all" is Control+A, then the modifiers released.
KEYS = {"enter": "\ue007", "tab": "\ue004", "home": "\ue011", "end": "\ue010", "left": "\ue012",
        "right": "\ue014", "backspace": "\ue003", "select all": "\ue009a\ue000"}


class WebDriverError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    """One headless Chromium session. Use as a context manager."""

    def __init__(self, *, width: int = 1280, height: int = 900, timeout: float = 30.0,
                 download_dir: str | os.PathLike[str] | None = None):
        missing = [p for p in (CHROMEDRIVER, CHROMIUM) if not Path(p).exists()]
        if missing:
            raise WebDriverError(f"{', '.join(missing)} not found: install them with `{INSTALL_HINT}`")
        self._tmp = tempfile.mkdtemp(prefix="vbs-webdriver-")
        self._log = open(Path(self._tmp) / "chromedriver.log", "wb")
        self.port = _free_port()
        self._proc = subprocess.Popen(
            [CHROMEDRIVER, f"--port={self.port}"],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.base = f"http://127.0.0.1:{self.port}"
        self.session_id: str | None = None
        # Downloads land here without a prompt (the page's "Download vocabulary" button).
        self.download_dir = Path(download_dir) if download_dir else Path(self._tmp) / "downloads"
        self.download_dir.mkdir(parents=True, exist_ok=True)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if self._proc.poll() is not None:
                    raise WebDriverError(f"chromedriver exited with {self._proc.returncode}: {self.driver_log()}")
                try:
                    if self._call("GET", "/status", timeout=2).get("ready"):
                        break
                except (OSError, WebDriverError):
                    pass
                if time.monotonic() > deadline:
                    raise WebDriverError(f"chromedriver did not become ready: {self.driver_log()}")
                time.sleep(0.1)
            caps = {
                "capabilities": {
                    "alwaysMatch": {
                        "browserName": "chrome",
                        "goog:chromeOptions": {
                            "binary": CHROMIUM,
                            "args": [
                                "--headless=new",
                                "--no-sandbox",
                                "--disable-gpu",
                                "--disable-dev-shm-usage",
                                "--disable-quic",
                                "--no-first-run",
                                "--disable-background-networking",
                                "--disable-component-update",
                                "--disable-sync",
                                f"--window-size={width},{height}",
                                f"--user-data-dir={Path(self._tmp) / 'profile'}",
                            ],
                            "prefs": {
                                "download.default_directory": str(self.download_dir),
                                "download.prompt_for_download": False,
                            },
                        },
                        "goog:loggingPrefs": {"browser": "ALL"},
                    }
                }
            }
            value = self._call("POST", "/session", caps, timeout=60)
            self.session_id = value["sessionId"]
            self.set_window_size(width, height)
        except BaseException:
            self.quit()
            raise

    # -- plumbing
    def driver_log(self) -> str:
        try:
            self._log.flush()
            return (Path(self._tmp) / "chromedriver.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def _call(self, method: str, path: str, body: Any = None, timeout: float = 60) -> Any:
        data = None if body is None else json.dumps(body).encode()
        if method == "POST" and data is None:
            data = b"{}"
        req = urllib.request.Request(
            self.base + path, data=data, method=method, headers={"Content-Type": "application/json; charset=utf-8"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                payload = json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                value = json.loads(exc.read()).get("value", {})
                msg = f"{value.get('error')}: {value.get('message', '')}".strip()
            except Exception:
                msg = str(exc)
            raise WebDriverError(f"{method} {path} -> HTTP {exc.code}: {msg[:2000]}") from None
        return payload.get("value") if isinstance(payload, dict) else payload

    def _s(self, method: str, path: str, body: Any = None, timeout: float = 60) -> Any:
        return self._call(method, f"/session/{self.session_id}{path}", body, timeout)

    # -- commands
    def set_window_size(self, width: int, height: int) -> None:
        self._s("POST", "/window/rect", {"width": width, "height": height})

    def get(self, url: str) -> None:
        self._s("POST", "/url", {"url": url}, timeout=120)

    def execute(self, script: str, *args: Any, timeout: float = 120) -> Any:
        return self._s("POST", "/execute/sync", {"script": script, "args": list(args)}, timeout)

    def execute_async(self, script: str, *args: Any, timeout: float = 120) -> Any:
        """``script`` gets its arguments and, last, a ``done(value)`` callback."""
        return self._s("POST", "/execute/async", {"script": script, "args": list(args)}, timeout)

    def find(self, css: str) -> str:
        """The WebDriver id of the first element matching the CSS selector."""
        value = self._s("POST", "/element", {"using": "css selector", "value": css})
        return value[ELEMENT_KEY]

    def click(self, css: str) -> None:
        """A real click (scrolled into view, hit-tested), as a user makes it."""
        self._s("POST", f"/element/{self.find(css)}/click")

    def send_keys(self, css: str, text: str) -> None:
        """Type into the element (it gets the focus first); use the KEYS code points for special keys."""
        self._s("POST", f"/element/{self.find(css)}/value", {"text": text})

    def wait_for_download(self, name: str, timeout: float = 30.0) -> Path:
        """The finished download `name` in download_dir (Chromium writes a .crdownload first)."""
        path = self.download_dir / name
        deadline = time.monotonic() + timeout
        while not (path.is_file() and not path.with_name(name + ".crdownload").exists()):
            if time.monotonic() > deadline:
                found = sorted(p.name for p in self.download_dir.iterdir())
                raise WebDriverError(f"no download {name!r} after {timeout:.0f} s (folder holds {found})")
            time.sleep(0.05)
        return path

    def wait_for(self, js_condition: str, timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = self.execute(f"return ({js_condition});")
            if value:
                return value
            if time.monotonic() > deadline:
                raise WebDriverError(f"timed out waiting for: {js_condition}")
            time.sleep(0.05)

    def next_frames(self, n: int = 2) -> None:
        """Wait until the page has painted ``n`` animation frames."""
        self.execute_async(
            "var done = arguments[arguments.length - 1], n = arguments[0];"
            "function f() { if (--n <= 0) done(true); else requestAnimationFrame(f); }"
            "requestAnimationFrame(f);",
            n,
        )

    def screenshot(self) -> bytes:
        return base64.b64decode(self._s("GET", "/screenshot"))

    def browser_log(self) -> list[dict] | None:
        """Console entries since the last call, or None where the driver does
        not offer the (legacy, non-W3C) log endpoint."""
        try:
            return self._s("POST", "/se/log", {"type": "browser"})
        except WebDriverError:
            return None

    def quit(self) -> None:
        if self.session_id is not None:
            try:
                self._s("DELETE", "", timeout=30)
            except (OSError, WebDriverError):
                pass
            self.session_id = None
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._log.close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.quit()
