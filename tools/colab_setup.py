"""Installs this repository on Colab / Kaggle without replacing the GPU build of torch that
the runtime already has. Elsewhere it does nothing.

The notebooks' first cell (about a dozen lines, the same in every notebook; tests/
test_colab_setup.py runs it) finds this file — in a ``dpkd-study`` folder it cloned from
``DPKD_REPO_URL``, or inside an uploaded ``dpkd-study*.zip`` or ``dpkd-study*`` folder — and
hands over to `setup`. It runs before the repository is installed, so it is standalone
(standard library only). Where the code comes from, first match wins:

1. the working directory itself, or a ``dpkd-study`` folder in it (a re-run of the cell);
2. ``DPKD_REPO_URL``: a git URL to clone (``os.environ["DPKD_REPO_URL"] = "https://..."`` in a
   cell above, or a Colab/Kaggle secret exported as that variable);
3. an uploaded ``dpkd-study*.zip`` (``git archive`` or GitHub's "Download ZIP") in the working
   directory or, on Kaggle, in ``/kaggle/input/*/``;
4. an uploaded ``dpkd-study*`` folder holding ``pyproject.toml`` (copied: Kaggle inputs are
   read-only).

Install: ``pip install --no-deps -e dpkd-study``, then only the requirements of its
``pyproject.toml`` that are missing or at a version outside its range — at the exact versions
of ``requirements.txt`` — never torch (pip runs with a constraint that holds the installed
torch). Then the working directory becomes the repository. ``DPKD_SETUP_DRY_RUN=1`` prints the
pip commands instead of running them (tests).
"""
import glob
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

REPO_DIR = "dpkd-study"
NEVER_INSTALL = {"torch"}  # the runtime's CUDA build stays


def on_colab_or_kaggle() -> bool:
    return bool("google.colab" in sys.modules or os.environ.get("COLAB_RELEASE_TAG")
                or os.environ.get("KAGGLE_KERNEL_RUN_TYPE"))


def _is_repo(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "pyproject.toml"))


def find_source(workdir: str):
    """(kind, where) of the code to install: present | git | zip | folder; None if nothing."""
    target = os.path.join(workdir, REPO_DIR)
    for here in (workdir, target):   # a re-run: the cell before it moved into the repository
        if _is_repo(here) and os.path.isfile(os.path.join(here, "tools", "colab_setup.py")):
            return "present", here
    if os.environ.get("DPKD_REPO_URL"):
        return "git", os.environ["DPKD_REPO_URL"]
    places = [workdir, *sorted(glob.glob("/kaggle/input/*"))]
    for place in places:
        for path in sorted(glob.glob(os.path.join(place, "dpkd-study*.zip"))):
            return "zip", path
    for place in places:
        for path in sorted(glob.glob(os.path.join(place, "dpkd-study*"))):
            if os.path.isdir(path) and _is_repo(path) and os.path.abspath(path) != os.path.abspath(target):
                return "folder", path
    return None


def fetch(kind: str, where: str, workdir: str) -> str:
    """Put the repository at ``workdir/dpkd-study``; returns that path."""
    target = os.path.join(workdir, REPO_DIR)
    if kind == "present":
        return where
    if kind == "git":
        subprocess.run(["git", "clone", "--depth", "1", where, target], check=True)
    elif kind == "zip":
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            with zipfile.ZipFile(where) as archive:
                archive.extractall(tmp)
            tops = [os.path.join(tmp, d) for d in os.listdir(tmp)]
            root = tops[0] if len(tops) == 1 and _is_repo(tops[0]) else tmp
            if not _is_repo(root):
                raise RuntimeError(f"{where} holds no pyproject.toml at its top: not a dpkd-study archive")
            shutil.move(root, target) if root != tmp else shutil.copytree(tmp, target)
    elif kind == "folder":
        shutil.copytree(where, target)
    return target


def _requirement_parser():
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip always carries a copy
        from pip._vendor.packaging.requirements import Requirement
    return Requirement


def _dependencies(repo: str) -> list:
    text = open(os.path.join(repo, "pyproject.toml"), encoding="utf-8").read()
    try:
        import tomllib
        return list(tomllib.loads(text)["project"]["dependencies"])
    except ImportError:  # Python < 3.11: the list is one literal in [project]
        block = re.search(r"^dependencies\s*=\s*\[(.*?)\]", text, re.S | re.M).group(1)
        return re.findall(r'"([^"]+)"', block)


def _pins(repo: str) -> dict:
    """{normalised name: 'name==version'} from requirements.txt (the versions tested here)."""
    path = os.path.join(repo, "requirements.txt")
    pins = {}
    if os.path.isfile(path):
        for line in open(path, encoding="utf-8"):
            line = line.split("#")[0].strip()
            if "==" in line:
                pins[_norm(line.split("==")[0])] = line
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def missing_requirements(repo: str) -> list:
    """The requirements to install: pyproject's dependencies not installed, or installed at a
    version outside their range, as requirements.txt pins them; torch never."""
    Requirement = _requirement_parser()
    pins, out = _pins(repo), []
    for text in _dependencies(repo):
        req = Requirement(text)
        if _norm(req.name) in NEVER_INSTALL:
            continue
        try:
            have = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            have = None
        if have is None or (req.specifier and not req.specifier.contains(have, prereleases=True)):
            out.append(pins.get(_norm(req.name), text))
    return out


def pip(args: list, dry_run: bool) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", *args]
    if dry_run:
        print("dry run:", " ".join(cmd))
    else:
        subprocess.run(cmd, check=True)


def setup(workdir: str = ".", dry_run=None):
    """Fetch and install the repository; returns its path, or None (one line says why)."""
    if dry_run is None:
        dry_run = os.environ.get("DPKD_SETUP_DRY_RUN") == "1"
    if not on_colab_or_kaggle():
        return None
    workdir = os.path.abspath(workdir)
    source = find_source(workdir)
    if source is None:
        print(f"dpkd-study: nothing to install: set DPKD_REPO_URL to the repository's git URL, or "
              f"upload dpkd-study*.zip (or a dpkd-study folder) to {workdir}, then rerun this cell")
        return None
    repo = fetch(*source, workdir)
    pip(["--no-deps", "-e", repo], dry_run)
    todo = missing_requirements(repo)
    if todo:
        try:
            torch = f"torch=={importlib.metadata.version('torch')}"
        except importlib.metadata.PackageNotFoundError:
            torch = None
        args = list(todo)
        if torch:  # pip may add packages, never replace the runtime's torch
            constraint = os.path.join(repo, ".colab-constraints.txt")
            with open(constraint, "w") as fh:
                fh.write(torch + "\n")
            args = ["-c", constraint, *args]
        pip(args, dry_run)
    print(f"dpkd-study: {source[0]} -> {repo}; installed --no-deps"
          + (f", plus {', '.join(todo)}" if todo else ", every requirement already present"))
    os.chdir(repo)
    if repo not in sys.path:
        sys.path.insert(0, repo)
    return repo


if __name__ == "__main__":
    result = setup()
    if result is None and on_colab_or_kaggle():
        sys.exit(1)
