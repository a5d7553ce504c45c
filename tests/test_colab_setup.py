"""The notebooks' first cell on Colab / Kaggle and tools/colab_setup.py it hands over to, run
on a CPU against local copies of this repository: Colab is simulated with COLAB_RELEASE_TAG in a
temporary working directory, and pip with DPKD_SETUP_DRY_RUN (the commands are printed, not
run). The cell is taken from notebook 00 (tests/test_notebooks.py checks that every notebook
carries the same one)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "colab_setup.py"
FIRST_CELL = nbformat.read(ROOT / "notebooks" / "00_theory.ipynb", as_version=4).cells[0].source


def run_cell(workdir: Path, **env) -> subprocess.CompletedProcess:
    """The notebooks' first cell as a script, in `workdir`, with `env` set."""
    clean = {k: v for k, v in os.environ.items()
             if k not in ("COLAB_RELEASE_TAG", "KAGGLE_KERNEL_RUN_TYPE", "DPKD_REPO_URL")}
    return subprocess.run([sys.executable, "-c", FIRST_CELL], cwd=workdir, capture_output=True, text=True,
                          env=dict(clean, DPKD_SETUP_DRY_RUN="1", **env), timeout=120)


def installs(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("dry run:")]


@pytest.fixture(scope="module")
def local_repo(tmp_path_factory):
    """A git repository holding this project's committed files (what a clone would get)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    repo = tmp_path_factory.mktemp("origin") / "dpkd-study-origin"
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{ROOT}", str(repo)], check=True)
    return repo


def test_clones_from_the_url_and_never_installs_torch(tmp_path, local_repo):
    res = run_cell(tmp_path, COLAB_RELEASE_TAG="test", DPKD_REPO_URL=f"file://{local_repo}")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "dpkd-study" / "dpkd_lib" / "train.py").exists()
    cmds = installs(res.stdout)
    assert cmds[0].endswith(f"install -q --no-deps -e {tmp_path / 'dpkd-study'}")
    for cmd in cmds:  # what pip is asked to install: never torch
        args = cmd.split(" install -q ", 1)[1].split()
        wanted = [a for i, a in enumerate(args) if not a.startswith("-") and args[i - 1] != "-c"]
        assert not any(a.lower().startswith("torch") for a in wanted), cmd
    assert res.stdout.strip().splitlines()[-1].startswith("dpkd-study: present ->")   # the cell cloned it
    again = run_cell(tmp_path, COLAB_RELEASE_TAG="test")  # a re-run finds the clone
    assert again.returncode == 0 and "dpkd-study: present ->" in again.stdout
    inside = run_cell(tmp_path / "dpkd-study", COLAB_RELEASE_TAG="test",   # a re-run from inside the repo
                      DPKD_REPO_URL=f"file://{local_repo}")
    assert inside.returncode == 0 and f"present -> {tmp_path / 'dpkd-study'};" in inside.stdout
    assert not (tmp_path / "dpkd-study" / "dpkd-study").exists()


def test_first_cell_is_short_and_hands_over_to_the_script():
    lines = FIRST_CELL.splitlines()
    assert len(lines) <= 15 and "tools/colab_setup.py" in FIRST_CELL
    assert "DPKD_REPO_URL" in FIRST_CELL and "dpkd-study*.zip" in FIRST_CELL


def test_installs_from_an_uploaded_zip(tmp_path, local_repo):
    subprocess.run(["git", "-C", str(local_repo), "archive", "--format=zip", "--prefix=dpkd-study-main/",
                    "-o", str(tmp_path / "dpkd-study-main.zip"), "HEAD"], check=True)
    res = run_cell(tmp_path, KAGGLE_KERNEL_RUN_TYPE="Interactive")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "dpkd-study" / "pyproject.toml").exists()
    assert "dpkd-study: zip ->" in res.stdout


def test_says_what_to_do_when_there_is_nothing_and_does_nothing_off_colab(tmp_path):
    res = run_cell(tmp_path, COLAB_RELEASE_TAG="test")
    assert res.returncode == 1 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "set DPKD_REPO_URL" in lines[0] and "upload dpkd-study*.zip" in lines[0]
    off = run_cell(tmp_path, DPKD_REPO_URL="file:///nowhere")
    assert off.returncode == 0 and off.stdout == off.stderr == "" and not (tmp_path / "dpkd-study").exists()


def test_installs_from_an_uploaded_folder(tmp_path, local_repo):
    shutil.copytree(local_repo, tmp_path / "dpkd-study-upload", ignore=shutil.ignore_patterns(".git"))
    res = run_cell(tmp_path, COLAB_RELEASE_TAG="test")
    assert res.returncode == 0, res.stderr
    assert "dpkd-study: folder ->" in res.stdout and (tmp_path / "dpkd-study" / "dpkd_lib").is_dir()


def test_only_missing_or_out_of_range_requirements_are_installed(tmp_path, monkeypatch):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import colab_setup
    finally:
        sys.path.remove(str(SCRIPT.parent))
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\ndependencies = [\n  "torch>=99", "pyyaml", "transformers>=99.0",\n'
        '  "surely-not-installed-dpkd", "tqdm",\n]\n')
    (tmp_path / "requirements.txt").write_text("transformers==99.1.0  # pinned\ntqdm==1.0\n")
    todo = colab_setup.missing_requirements(str(tmp_path))
    # torch is never touched even when out of range; present packages in range stay
    assert todo == ["transformers==99.1.0", "surely-not-installed-dpkd"]
