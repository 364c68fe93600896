#!/usr/bin/env python3
"""Opens a `rudder report` page in headless Chromium and reports what a reader would see.

    python3 scripts/check_report.py REPORT.html [--screenshot PAGE.png]

Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: standard
library only, no network, no driver). The page is loaded from its file; then this prints one JSON
object on stdout:

- `console`: console messages, uncaught exceptions and browser log entries of level warning or
  error (a failed resource load is one);
- `requests`: every URL the page asked for other than itself (the report must need none);
- `charts`: per chart figure, its metric, the series its legend names with their colours, the
  stroke colour of every <polyline> in its SVG, the SVG's texts, and its rendered size;
- `tables`, `sections`: how many tables and which section ids the page has.

The exit status is 0 when the page loaded with no console error and no request, 1 otherwise, 2
when Chromium cannot be started. Chromium is `$CHROMIUM`, else `chromium` on the PATH.
"""

import base64
import json
import os
import select
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--remote-debugging-pipe",
]

INSPECT = r"""
(() => {
  const charts = [...document.querySelectorAll('figure.chart')].map(f => {
    const svg = f.querySelector('svg');
    const box = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
    return {
      metric: f.dataset.metric,
      series: [...f.querySelectorAll('li[data-color]')].map(li => ({node: li.textContent.trim(), color: li.dataset.color})),
      polylines: svg ? [...svg.querySelectorAll('polyline')].map(p => (p.getAttribute('stroke') || '').toLowerCase()) : [],
      texts: svg ? [...svg.querySelectorAll('text')].map(t => t.textContent.trim()) : [],
      width: box.width,
      height: box.height,
    };
  });
  return JSON.stringify({
    title: document.title,
    charts,
    tables: document.querySelectorAll('table').length,
    sections: [...document.querySelectorAll('section')].map(s => s.id),
    dag_nodes: document.querySelectorAll('.dag svg rect').length,
    height: document.documentElement.scrollHeight,
  });
})()
"""


class Browser:
    """Chromium with the DevTools protocol on fds 3 (commands in) and 4 (replies out)."""

    def __init__(self, executable):
        self.profile = tempfile.mkdtemp(prefix="rudder-chromium-")
        cmd_r, self.cmd_w = os.pipe()
        self.out_r, out_w = os.pipe()
        args = [executable, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"]
        # The shell moves the pipe ends to the fds Chromium reads and writes.
        self.proc = subprocess.Popen(
            ["sh", "-c", f"exec {shlex.join(args)} 3<&{cmd_r} 4>&{out_w}"],
            pass_fds=(cmd_r, out_w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(cmd_r)
        os.close(out_w)
        self.buffer = b""
        self.next_id = 0
        self.events = []

    def send(self, method, params=None, session=None):
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.cmd_w, json.dumps(message).encode() + b"\0")
        return self.next_id

    def wait_for(self, predicate, timeout=60.0):
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\0", 1)
                message = json.loads(raw)
                if predicate(message):
                    return message
                self.events.append(message)
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.out_r], [], [], left)[0]:
                raise TimeoutError("no answer from Chromium")
            chunk = os.read(self.out_r, 1 << 20)
            if not chunk:
                raise EOFError("Chromium closed the DevTools pipe")
            self.buffer += chunk

    def call(self, method, params=None, session=None):
        i = self.send(method, params, session)
        reply = self.wait_for(lambda m: m.get("id") == i)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def drain(self, seconds):
        try:
            self.wait_for(lambda m: False, timeout=seconds)
        except TimeoutError:
            pass

    def close(self):
        try:
            self.send("Browser.close")
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


def main(argv):
    args = argv[1:]
    screenshot = None
    if "--screenshot" in args:
        i = args.index("--screenshot")
        screenshot = args[i + 1]
        del args[i : i + 2]
    if len(args) != 1 or not os.path.isfile(args[0]):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    page = "file://" + os.path.abspath(args[0])
    executable = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if not executable:
        print("error: Chromium not found (set CHROMIUM or install Debian's chromium)", file=sys.stderr)
        return 2
    try:
        browser = Browser(executable)
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
    except (OSError, TimeoutError, EOFError) as e:
        print(f"error: Chromium did not start: {e}", file=sys.stderr)
        return 2
    try:
        session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page", "Network"):
            browser.call(f"{domain}.enable", session=session)
        browser.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1400, "height": 1000, "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        browser.call("Page.navigate", {"url": page}, session=session)
        browser.wait_for(lambda m: m.get("method") == "Page.loadEventFired")
        browser.drain(0.5)
        found = json.loads(
            browser.call(
                "Runtime.evaluate", {"expression": INSPECT, "returnByValue": True}, session=session
            )["result"]["value"]
        )
        if screenshot:
            height = min(int(found["height"]), 32000)
            browser.call(
                "Emulation.setDeviceMetricsOverride",
                {"width": 1400, "height": height, "deviceScaleFactor": 1, "mobile": False},
                session=session,
            )
            shot = browser.call("Page.captureScreenshot", {"format": "png"}, session=session)
            with open(screenshot, "wb") as f:
                f.write(base64.b64decode(shot["data"]))
        browser.drain(0.2)
    finally:
        browser.close()

    console, requests = [], []
    for event in browser.events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            console.append(f"console.{params.get('type')}: {text}")
        elif method == "Runtime.exceptionThrown":
            console.append(f"exception: {params['exceptionDetails'].get('text')}")
        elif method == "Log.entryAdded" and params["entry"]["level"] in ("warning", "error"):
            entry = params["entry"]
            console.append(f"{entry['source']} {entry['level']}: {entry['text']} {entry.get('url', '')}".strip())
        elif method == "Network.requestWillBeSent":
            url = params["request"]["url"]
            if url != page and not url.startswith(("data:", "about:")):
                requests.append(url)
    found["console"] = console
    found["requests"] = requests
    print(json.dumps(found, indent=1))
    return 1 if console or requests else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
