"""Look at a page of the MLflow UI the way a user does: headless Chromium driven by chromedriver over the W3C
WebDriver protocol (plain HTTP, no selenium package), with Debian's `chromium` and `chromium-driver`.

    python tests/support/browser_check.py URL --expect "uitest" --expect "syn-target-food k=4 seed=1 source" \
        --click "css:button[data-component-id*=runnamecellrenderer]" --screenshot runs.png

Opens URL, waits until the page shows the first expected text, clicks each `--click` target (a button's visible
text, or `css:SELECTOR` for every element it matches: MLflow's runs table folds child runs under their parent until
the "+" next to the parent's name is clicked), waits until every expected text is visible, writes a screenshot and
prints the visible text; exits 0, or 1 naming what never appeared.
`check_page()` does the same from Python (tests/test_mlflow_ui.py).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

CHROME_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1600,1000",
]


def find_browser() -> tuple[str | None, str | None]:
    """(chromium, chromedriver) executables, or None for each one that is not installed."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return chromium, driver


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Driver:
    """The few WebDriver commands a check needs."""

    def __init__(self, base: str):
        self.base = base
        self.session: str | None = None

    def call(self, method: str, path: str, body: dict | None = None, timeout: float = 60) -> object:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                return json.loads(resp.read() or b"{}").get("value")
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:500]
            raise RuntimeError(f"WebDriver {method} {path}: HTTP {err.code} {detail}") from None

    def start(self, chromium: str, profile: str) -> None:
        caps = {
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {"binary": chromium, "args": [*CHROME_ARGS, f"--user-data-dir={profile}"]},
                }
            }
        }
        self.session = self.call("POST", "/session", caps, timeout=120)["sessionId"]

    def s(self, path: str) -> str:
        return f"/session/{self.session}{path}"

    def visible_text(self) -> str:
        return (
            self.call(
                "POST",
                self.s("/execute/sync"),
                {"script": "return document.body ? document.body.innerText : ''", "args": []},
            )
            or ""
        )

    def click(self, target: str) -> int:
        """Click `css:SELECTOR` (every match) or the first button whose visible text is `target`; how many."""
        script = (
            "const want = arguments[0]; let hits;"
            "if (want.startsWith('css:')) { hits = Array.from(document.querySelectorAll(want.slice(4))); }"
            "else { const all = Array.from(document.querySelectorAll('button, [role=button], label'));"
            "       hits = all.filter(e => (e.innerText || '').trim() === want).slice(0, 1); }"
            "hits.forEach(e => e.click()); return hits.length;"
        )
        return int(self.call("POST", self.s("/execute/sync"), {"script": script, "args": [target]}) or 0)

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("GET", self.s("/screenshot"))))

    def quit(self) -> None:
        if self.session:
            try:
                self.call("DELETE", self.s(""), timeout=30)
            except (OSError, RuntimeError):
                pass
            self.session = None


def _wait_for(driver: _Driver, texts: list[str], timeout_s: float) -> tuple[list[str], str]:
    deadline = time.monotonic() + timeout_s
    while True:
        text = driver.visible_text()
        missing = [t for t in texts if t not in text]
        if not missing or time.monotonic() > deadline:
            return missing, text
        time.sleep(0.5)


def check_page(
    url: str, expect: list[str], click: list[str] = (), screenshot: Path | None = None, timeout_s: float = 60
) -> dict:
    """Open `url` in headless Chromium, click the `click` buttons, wait for every `expect` text.

    Returns {"missing": [...], "text": visible text, "clicked": {target: elements clicked}, "screenshot": path or None}.
    Raises RuntimeError when chromium or chromedriver is not installed or the browser cannot start.
    """
    chromium, driver_exe = find_browser()
    if not chromium or not driver_exe:
        raise RuntimeError(
            "headless Chromium needs the Debian packages chromium and chromium-driver "
            "(apt-get install chromium chromium-driver)"
        )
    port = _free_port()
    profile = tempfile.mkdtemp(prefix="dept-chromium-")
    log_file = open(Path(profile).with_suffix(".driver.log"), "w")
    proc = subprocess.Popen(
        [driver_exe, f"--port={port}", "--allowed-ips=127.0.0.1"],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    driver = _Driver(f"http://127.0.0.1:{port}")
    try:
        for _ in range(100):  # chromedriver answers /status within a second or two
            try:
                if driver.call("GET", "/status", timeout=2).get("ready"):
                    break
            except (OSError, RuntimeError):
                pass
            time.sleep(0.2)
        driver.start(chromium, profile)
        driver.call("POST", driver.s("/url"), {"url": url}, timeout=timeout_s)
        missing, text = _wait_for(driver, expect[:1], timeout_s)  # the page has rendered its data
        clicked = {}
        for target in click:  # the table renders its rows (and their buttons) after the first text shows
            deadline = time.monotonic() + timeout_s
            while not (clicked.get(target) or time.monotonic() > deadline):
                time.sleep(0.5)
                clicked[target] = driver.click(target)
        missing, text = _wait_for(driver, list(expect), timeout_s if not missing else 1)
        if screenshot is not None:
            driver.screenshot(Path(screenshot))
        return {"missing": missing, "text": text, "clicked": clicked, "screenshot": screenshot}
    finally:
        driver.quit()
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        log_file.close()
        shutil.rmtree(profile, ignore_errors=True)
        Path(profile).with_suffix(".driver.log").unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--expect", action="append", default=[], help="text the page must show (repeatable)")
    parser.add_argument(
        "--click", action="append", default=[], help="button text, or css:SELECTOR, to click first (repeatable)"
    )
    parser.add_argument("--screenshot", type=Path, default=None)
    parser.add_argument("--timeout", type=float, default=60)
    args = parser.parse_args(argv)
    result = check_page(args.url, args.expect, args.click, args.screenshot, args.timeout)
    print(result["text"])
    if result["missing"]:
        print(f"NOT SHOWN: {result['missing']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
