"""The notebooks as a reader sees them: JupyterLab (the server of `make lab`, tools/lab.sh) in
headless Chromium (Debian's `chromium`), driven over the DevTools protocol.

    python tools/browser_check.py [--out results/browser] [NOTEBOOK ...]

For each notebook it waits until JupyterLab has rendered every cell, then reports each error
output, leaked warning, broken image, widget that did not render, formula MathJax could not
typeset, heading that appears twice, and log wall (more than LOG_LINES lines of text in a
cell, or ten times that in progress-bar redraws stored in the file), and saves screenshots of the notebook
page by page (<out>/<stem>-NN.png). `--run` also runs the notebook on the server's kernel
through the UI (menu Run > Run All Cells) before checking it; a notebook run that way is
never saved (autosave is off) and tests/test_browser.py runs a copy.

`make browser-test` installs Chromium when it is missing and runs tests/test_browser.py,
which uses this module. Standard library only: Chromium is driven over the pipe of
--remote-debugging-pipe (no port, no driver binary, nothing downloaded).
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# Flags that work in a container as root with no display and no network: nothing is fetched
# in the background (component updates, sync, field trials), no GPU, no sandbox (root).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--remote-debugging-pipe"]
WIDTH, HEIGHT = 1280, 900
LOG_LINES = 60          # a text output longer than this is a log wall (the notebooks aim at ~40)
MAX_PAGES = 30          # screenshots per notebook
# JupyterLab settings for the check: every cell attached to the page (the default attaches
# off-screen cells lazily, which would hide their outputs from the checks), no autosave (a run
# never writes the notebook), no news or update requests (no network; no toast over the page).
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
        {"fetchNews": "false", "checkForUpdates": False},
}


class BrowserError(RuntimeError):
    pass


# ------------------------------------------------------------------------------ Chromium

class Chromium:
    """One headless Chromium and one page, driven over the DevTools protocol on the pipe of
    --remote-debugging-pipe: Chromium reads commands on fd 3 and writes replies and events on
    fd 4, one JSON message each, ended by a NUL byte."""

    def __init__(self, log: Path, width: int = WIDTH, height: int = HEIGHT):
        if not os.access(CHROMIUM, os.X_OK):
            raise BrowserError(f"{CHROMIUM} not found: install Debian's chromium (make browser-test does)")
        self.profile = tempfile.mkdtemp(prefix="dpkd-chromium-")
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        args = [*FLAGS, f"--user-data-dir={self.profile}", f"--window-size={width},{height}", "about:blank"]
        with open(log, "wb") as out:
            # bash puts the two pipe ends on fds 3 and 4, where Chromium looks for them (dash
            # takes single-digit fds only)
            self.proc = subprocess.Popen(
                ["/bin/bash", "-c", f'exec "$0" "$@" 3<&{to_r} 4>&{from_w}', CHROMIUM, *args],
                pass_fds=(to_r, from_w), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)
        os.close(to_r)
        os.close(from_w)
        self._w = os.fdopen(to_w, "wb", buffering=0)
        self._r = os.fdopen(from_r, "rb", buffering=0)
        self._id = 0
        self._write_lock = threading.Lock()
        self._replies: dict[int, dict] = {}
        self.exceptions: list[str] = []         # uncaught JavaScript exceptions of the page
        self.dialogs: list[str] = []            # alert / confirm / leave-page dialogs, accepted
        self._cv = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime"):
            self.page(f"{domain}.enable")
        self.page("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=False)
        self.width, self.height = width, height

    def _read(self):
        buf = b""
        while chunk := self._r.read(1 << 16):
            buf += chunk
            *messages, buf = buf.split(b"\0")
            for raw in messages:
                msg = json.loads(raw)
                with self._cv:
                    if "id" in msg:
                        self._replies[msg["id"]] = msg
                    elif msg.get("method") == "Page.javascriptDialogOpening":
                        # e.g. "leave the page?" after a run left the notebook unsaved: accept,
                        # answering from this thread without waiting for the reply
                        self.dialogs.append(f"{msg['params']['type']}: {msg['params']['message']}")
                        self._post("Page.handleJavaScriptDialog", msg.get("sessionId"), accept=True)
                    elif msg.get("method") == "Runtime.exceptionThrown":
                        d = msg["params"]["exceptionDetails"]
                        self.exceptions.append(d.get("exception", {}).get("description") or d.get("text", ""))
                    self._cv.notify_all()
        with self._cv:
            self._cv.notify_all()

    def _post(self, method: str, session: str | None = None, **params) -> int:
        with self._write_lock:
            self._id += 1
            msg = {"id": self._id, "method": method, "params": params,
                   **({"sessionId": session} if session else {})}
            self._w.write(json.dumps(msg).encode() + b"\0")
            return self._id

    def send(self, method: str, session: str | None = None, timeout: float = 60, **params):
        i = self._post(method, session, **params)
        with self._cv:
            if not self._cv.wait_for(lambda: i in self._replies or self.proc.poll() is not None, timeout):
                raise BrowserError(f"Chromium did not answer {method} in {timeout:.0f} s")
            if i not in self._replies:
                raise BrowserError(f"Chromium exited ({self.proc.returncode}) during {method}")
            reply = self._replies.pop(i)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error'].get('message')}")
        return reply["result"]

    def page(self, method: str, **params):
        return self.send(method, session=self.session, **params)

    def goto(self, url: str):
        self.exceptions.clear()
        self.dialogs.clear()
        self.page("Page.navigate", url=url)

    def js(self, expression: str):
        """The value of a JavaScript expression in the page (promises awaited)."""
        r = self.page("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise BrowserError(f"page script failed: {d.get('exception', {}).get('description') or d.get('text')}")
        return r["result"].get("value")

    def wait(self, expression: str, timeout: float, what: str, every: float = 0.5):
        """Poll a JavaScript expression until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"{what}: not seen in {timeout:.0f} s")
            time.sleep(every)

    def click(self, selector: str, text: str | None = None):
        """A real mouse click (press and release) at the centre of the first element that
        matches the CSS selector (and whose text is `text`), as a person's click reaches the page."""
        box = self.js(f"""(() => {{ const e = [...document.querySelectorAll({json.dumps(selector)})]
            .find(e => {json.dumps(text)} === null || e.innerText.trim() === {json.dumps(text)});
            if (!e) return null; const r = e.getBoundingClientRect();
            return [r.x + r.width / 2, r.y + r.height / 2]; }})()""")
        if not box:
            raise BrowserError(f"nothing to click: {selector} {text or ''}")
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.page("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left",
                      clickCount=0 if kind == "mouseMoved" else 1)

    def screenshot(self, path: Path):
        path.write_bytes(base64.b64decode(self.page("Page.captureScreenshot", format="png")["data"]))

    def close(self):
        if self.proc.poll() is None:
            try:
                self.send("Browser.close", timeout=10)
            except BrowserError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        shutil.rmtree(self.profile, ignore_errors=True)


# ------------------------------------------------------------------------------ the server

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LabServer:
    """tools/lab.sh (what `make lab` starts) on a free port with a known token, its Jupyter
    settings and state in a fresh folder (no user settings, kernels or workspaces leak in),
    the app exposed to page scripts (window.jupyterapp) so that the check can see the kernel's
    state and the notebook's model."""

    def __init__(self, work: Path, python: str = sys.executable):
        self.port, self.token = _free_port(), secrets.token_hex(24)
        self.base = f"http://127.0.0.1:{self.port}"
        home = Path(tempfile.mkdtemp(prefix="dpkd-lab-"))
        self.home = home
        for name, value in LAB_SETTINGS.items():
            path = home / "settings" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(value))
        env = dict(os.environ, LAB_PYTHON=python, PYTHONUNBUFFERED="1",
                   JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_DATA_DIR=str(home / "data"),
                   JUPYTER_RUNTIME_DIR=str(home / "runtime"), IPYTHONDIR=str(home / "ipython"))
        self.log = work / "lab.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                ["sh", str(ROOT / "tools" / "lab.sh"), f"--port={self.port}", "--ServerApp.ip=127.0.0.1",
                 "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
                 "--expose-app-in-browser", f"--LabApp.user_settings_dir={home / 'settings'}",
                 f"--LabApp.workspaces_dir={home / 'workspaces'}"],
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise BrowserError(f"jupyter lab exited ({self.proc.returncode}); its log: {self.log}")
            try:
                self.api("GET", "/api/status")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise BrowserError(f"jupyter lab did not answer in 120 s; its log: {self.log}") from None
                time.sleep(0.5)

    def api(self, method: str, path: str):
        req = urllib.request.Request(self.base + path, method=method,
                                     headers={"Authorization": f"token {self.token}"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(req, timeout=30) as r:
            return json.loads(r.read() or b"null")

    def url(self, notebook: Path) -> str:
        rel = notebook.resolve().relative_to(ROOT).as_posix()
        return f"{self.base}/lab/tree/{rel}?reset&token={self.token}"

    def shut_down_kernels(self):
        for session in self.api("GET", "/api/sessions"):
            self.api("DELETE", f"/api/sessions/{session['id']}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        shutil.rmtree(self.home, ignore_errors=True)


# ------------------------------------------------------------------------------ the checks
# Page scripts. They read the open notebook from the exposed app (its panel, cells, outputs and
# kernel) and from the page it rendered. Plain strings: PANEL and LOG_LINES are filled in below.
_PANEL = "(window.jupyterapp && window.jupyterapp.shell.currentWidget)"
_READY = """(() => { const p = PANEL;
  if (!p || !p.content || !p.context || !p.context.isReady || !p.content.model) return false;
  const cells = p.node.querySelectorAll('.jp-Notebook .jp-Cell');
  const imgs = [...p.node.querySelectorAll('img')];
  return cells.length === p.content.model.cells.length && imgs.every(i => i.complete)
    && !p.node.querySelector('.jp-MarkdownCell:not(.jp-mod-rendered)')
    && JSON.stringify([cells.length, imgs.length, p.node.querySelectorAll('mjx-container').length,
                       p.node.querySelectorAll('.jp-OutputArea-output').length]);
})()"""
_KERNEL_IDLE = """(() => { const p = PANEL; const s = p && p.sessionContext;
  return !!(s && s.session && s.session.kernel && s.session.kernel.status === 'idle'); })()"""
_BUSY = """(() => PANEL.content.widgets.some(c => c.model.type === 'code'
  && /\\[\\*\\]/.test((c.node.querySelector('.jp-InputPrompt') || {}).innerText || '')))()"""
# Everything a reader would see as broken. JupyterLab shows an error output as stderr text,
# so the model's output types tell an error from a warning.
_FINDINGS = """(() => { const p = PANEL; const out = [];
  const cells = p.content.widgets;
  cells.forEach((cell, i) => {
    const n = `cell ${i}`;
    if (cell.model.type === 'code') {
      const outputs = cell.model.outputs.toJSON();
      outputs.forEach(o => {
        if (o.output_type === 'error') out.push(['error output', `${n}: ${o.ename}: ${String(o.evalue).slice(0, 160)}`]);
        if (o.output_type === 'stream' && o.name === 'stderr') {
          const w = [].concat(o.text).join('').match(/^.*(Warning|Traceback|Error)\\b.*$/m);
          if (w) out.push(['leaked warning', `${n}: ${w[0].slice(0, 160)}`]);
        }
      });
      // a log wall as the page shows it (a progress bar redrawn in place counts once)
      const shown = [...cell.node.querySelectorAll('.jp-OutputArea-output.jp-RenderedText')]
        .reduce((k, o) => k + o.innerText.trimEnd().split('\\n').length, 0);
      if (shown > LOG_LINES) out.push(['log wall', `${n}: ${shown} lines of text output`]);
      // a widget view must show as a widget, not as its text fallback or an error message
      const views = outputs.filter(o => o.data && o.data['application/vnd.jupyter.widget-view+json']).length;
      const widgets = [...cell.node.querySelectorAll('.jp-OutputArea-output')]
        .filter(w => w.querySelector('.jupyter-widgets') && !/Error displaying widget|Loading widget/.test(w.innerText)).length;
      if (widgets < views) out.push(['widget not rendered', `${n}: ${views - widgets} of ${views} widget views show no widget`]);
    }
    cell.node.querySelectorAll('img').forEach(img => {
      if (!img.complete || img.naturalWidth === 0) out.push(['broken image', `${n}: ${(img.getAttribute('src') || '').slice(0, 80)}`]);
    });
    cell.node.querySelectorAll('mjx-merror, .MathJax_Error').forEach(e =>
      out.push(['formula not typeset', `${n}: ${e.textContent.slice(0, 120)}`]));
  });
  // a heading twice: a pasted or duplicated cell a reader would trip over
  const headings = {};
  cells.forEach((cell, i) => cell.node.querySelectorAll('.jp-RenderedMarkdown :is(h1, h2, h3, h4)').forEach(h => {
    const t = h.textContent.replace(/¶$/, '').trim();
    if (t in headings) out.push(['repeated heading', `cell ${i}: "${t.slice(0, 100)}" (first in cell ${headings[t]})`]);
    else headings[t] = i;
  }));
  document.querySelectorAll('.jp-Dialog').forEach(d => out.push(['dialog open', d.innerText.trim().slice(0, 160)]));
  const code = cells.filter(c => c.model.type === 'code'), s = p.sessionContext;
  return {cells: cells.length, code: code.length,
    executed: code.filter(c => c.model.executionCount !== null).length,
    images: p.node.querySelectorAll('.jp-OutputArea img').length,
    formulas: p.node.querySelectorAll('mjx-container').length,
    widgets: p.node.querySelectorAll('.jp-OutputArea .jupyter-widgets').length,
    kernel: s && s.session && s.session.kernel ? s.session.kernel.name : null,
    findings: out};
})()"""
_READY, _KERNEL_IDLE, _BUSY, _FINDINGS = (
    js.replace("PANEL", _PANEL).replace("LOG_LINES", str(LOG_LINES))
    for js in (_READY, _KERNEL_IDLE, _BUSY, _FINDINGS))
_SCROLLER = ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-WindowedPanel-outer"
_SCROLL_TO = ("(y => { const s = document.querySelector(SEL); s.scrollTop = y;"
              " return [s.scrollTop, s.scrollHeight, s.clientHeight]; })").replace("SEL", json.dumps(_SCROLLER))


def open_notebook(browser: Chromium, lab: LabServer, notebook: Path, timeout: float = 120):
    browser.goto(lab.url(notebook))
    browser.wait(_READY, timeout, f"JupyterLab rendering {notebook.name}")
    browser.wait(_KERNEL_IDLE, timeout, f"an idle kernel for {notebook.name}")
    browser.js("window.jupyterapp.shell.collapseLeft()")    # the notebook alone, as a reader reads it
    _settle(browser)


def _settle(browser: Chromium, quiet: float = 1.5, timeout: float = 60):
    """Until the rendered page stops changing (cells, images loaded, formulas typeset)."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        now = browser.wait(_READY, timeout, "a rendered notebook")
        if now == last:
            return
        last = now
        time.sleep(quiet)


def run_all(browser: Chromium, timeout: float) -> float:
    """Menu Run > Run All Cells, as a reader does; wait until the kernel has run every cell or
    stopped at an error. Returns the seconds it took."""
    counts = f"JSON.stringify({_PANEL}.content.widgets.map(c => c.model.executionCount))"
    before = browser.js(counts)
    t0 = time.monotonic()
    browser.click(".lm-MenuBar-item", text="Run")
    browser.wait("""!!document.querySelector('.lm-Menu-item[data-command="runmenu:run-all"]')""", 10, "the Run menu")
    browser.click('.lm-Menu-item[data-command="runmenu:run-all"]')
    # running: a cell is queued or executing ([*]); done: none is, and the kernel is idle
    browser.wait(f"{_BUSY} || {counts} !== {json.dumps(before)}", 30, "Run All starting", every=0.2)
    browser.wait(f"!{_BUSY} && {_KERNEL_IDLE}", timeout, "Run All finishing", every=1)
    _settle(browser)
    return time.monotonic() - t0


def check(browser: Chromium) -> dict:
    """What the open notebook shows: counts, and every finding as (kind, where: what)."""
    return browser.js(_FINDINGS)


def stored_walls(notebook: Path) -> list[list[str]]:
    """Log walls in the file itself: JupyterLab draws a progress bar's redraws in place, but
    the file keeps every one, and GitHub or nbviewer may show them all."""
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    found = []
    for i, cell in enumerate(cells):
        text = "".join("".join(o.get("text", "")) for o in cell.get("outputs", []) if o["output_type"] == "stream")
        lines = len(re.split(r"\r\n|\r|\n", text.rstrip("\r\n"))) if text else 0
        if lines > 10 * LOG_LINES:
            found.append(["log wall", f"cell {i}: {lines} lines and progress-bar redraws stored in the file"])
    return found


def screenshots(browser: Chromium, out: Path, stem: str, max_pages: int = MAX_PAGES) -> list[Path]:
    """The notebook page by page (90 % of a screen each), as a reader scrolls through it."""
    shots, y = [], 0
    for page in range(1, max_pages + 1):
        top, height, view = browser.js(f"{_SCROLL_TO}({y})")
        time.sleep(0.3)
        path = out / f"{stem}-{page:02d}.png"
        browser.screenshot(path)
        shots.append(path)
        if top + view >= height - 2:
            break
        y = top + int(view * 0.9)
    browser.js(f"{_SCROLL_TO}(0)")
    return shots


def inspect(browser: Chromium, lab: LabServer, notebook: Path, out: Path, name: str | None = None,
            run: bool = False, run_timeout: float = 600) -> dict:
    """Open a notebook in JupyterLab (and run it, when asked), check it, and screenshot it as
    <out>/<name>-NN.png (name: the notebook's stem)."""
    open_notebook(browser, lab, notebook)
    result = {"notebook": notebook.resolve().relative_to(ROOT).as_posix()}
    if run:
        result["run_s"] = round(run_all(browser, run_timeout), 1)
    result.update(check(browser))
    if not run:
        result["findings"] += stored_walls(notebook)
    result["js_exceptions"] = list(browser.exceptions)
    result["screenshots"] = [p.relative_to(ROOT).as_posix() if p.is_relative_to(ROOT) else str(p)
                             for p in screenshots(browser, out, name or notebook.stem)]
    lab.shut_down_kernels()
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("notebooks", nargs="*", type=Path, help="default: results/cpu/notebooks/*.ipynb")
    ap.add_argument("--run", action="store_true", help="run each notebook on the kernel first (never saved)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "browser")
    args = ap.parse_args(argv)
    notebooks = args.notebooks or sorted((ROOT / "results" / "cpu" / "notebooks").glob("*.ipynb"))
    missing = [str(p) for p in notebooks if not p.is_file()]
    if missing:
        print(f"browser_check: no such notebook: {', '.join(missing)}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    lab = LabServer(args.out)
    browser = None
    try:
        browser = Chromium(args.out / "chromium.log")
        results = [inspect(browser, lab, nb, args.out, name=f"{nb.parent.name}-{nb.stem}", run=args.run)
                   for nb in notebooks]
    finally:
        if browser:
            browser.close()
        lab.stop()
    (args.out / "report.json").write_text(json.dumps(results, indent=1))
    bad = [f"{r['notebook']}: {kind}: {what}" for r in results for kind, what in r["findings"]]
    for r in results:
        print(f"{r['notebook']}: {r['cells']} cells, {r['images']} images, {r['formulas']} formulas, "
              f"{len(r['findings'])} problems, {len(r['screenshots'])} screenshots")
    print("\n".join(bad) or "no problem found")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
