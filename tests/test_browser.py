"""The notebooks as a reader sees them: JupyterLab, started by tools/lab.sh as `make lab` does,
in headless Chromium (tools/browser_check.py). `make browser-test` runs this file (it installs
Debian's chromium first when it is missing); `make test` skips it, since it may run where
there is no Chromium. Screenshots and report.json go to results/browser/ (git-ignored).

- the checker finds each kind of breakage in a notebook broken on purpose, and a live widget
  and figure render (so a clean result is not a blind one);
- every executed notebook of the study (results/<profile>/notebooks/, DPKD_BROWSER_NOTEBOOKS)
  and the source notebook 00 open with no error output, leaked warning, broken image, widget
  that does not render, formula that does not typeset, repeated heading, or log wall;
- notebook 00 runs to the end on the server's kernel through the Run menu, with the same
  checks on what it draws; the notebook on disk is never written.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(os.environ.get("DPKD_BROWSER_TEST") != "1",
                                reason="the browser test: make browser-test")

_spec = importlib.util.spec_from_file_location("browser_check", ROOT / "tools" / "browser_check.py")
bc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bc)

OUT = ROOT / "results" / "browser"
EXECUTED = Path(os.environ.get("DPKD_BROWSER_NOTEBOOKS", ROOT / "results" / "cpu" / "notebooks"))
SOURCE = ROOT / "notebooks" / "00_theory.ipynb"
KERNEL = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}


@pytest.fixture(scope="module")
def lab():
    """One JupyterLab server and one Chromium page for the whole file."""
    OUT.mkdir(parents=True, exist_ok=True)
    for old in [*OUT.glob("*.png"), *OUT.glob("*.ipynb"), OUT / "report.json"]:
        old.unlink(missing_ok=True)
    server = bc.LabServer(OUT)
    browser = None
    try:
        browser = bc.Chromium(OUT / "chromium.log")
        report = []
        yield server, browser, report
        (OUT / "report.json").write_text(json.dumps(report, indent=1))
    finally:
        if browser:
            browser.close()
        server.stop()


def inspect(lab, notebook: Path, name: str, run: bool = False) -> dict:
    server, browser, report = lab
    result = bc.inspect(browser, server, notebook, OUT, name=name, run=run)
    report.append(result)
    assert result["screenshots"] and all((ROOT / p).is_file() for p in result["screenshots"])
    return result


def problems(result: dict) -> str:
    return "\n".join(f"{kind}: {what}" for kind, what in result["findings"])


def _write(cells, path: Path) -> Path:
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": KERNEL})
    nb.cells = cells
    nbformat.write(nb, path)
    return path


def test_the_checker_finds_each_kind_of_breakage(lab):
    new = nbformat.v4
    cells = [
        new.new_markdown_cell("# Broken on purpose\n\n![a figure](no_such_figure.png)\n\n"
                              "A formula that cannot typeset: $\\frac{1}$.\n\n## A section"),
        new.new_code_cell("1 / 0", execution_count=1, outputs=[new.new_output(
            "error", ename="ZeroDivisionError", evalue="division by zero",
            traceback=["ZeroDivisionError: division by zero"])]),
        new.new_code_cell("import torch", execution_count=2, outputs=[new.new_output(
            "stream", name="stderr", text="x.py:3: FutureWarning: `a` is deprecated\n")]),
        new.new_code_cell("train()", execution_count=3, outputs=[new.new_output(
            "stream", name="stdout", text="".join(f"step {i}\n" for i in range(bc.LOG_LINES + 5)))]),
        new.new_code_cell("train()", execution_count=4, outputs=[new.new_output(
            "stream", name="stderr", text="".join(f"\rsft: {i}%|" for i in range(10 * bc.LOG_LINES + 5)))]),
        new.new_code_cell("slider", execution_count=5, outputs=[new.new_output("display_data", data={
            "application/vnd.jupyter.widget-view+json": {"model_id": "0" * 32, "version_major": 2,
                                                         "version_minor": 0},
            "text/plain": "IntSlider(value=3)"})]),
        new.new_code_cell("fig", execution_count=6, outputs=[new.new_output(
            "display_data", data={"image/png": "bm90IGEgcG5n", "text/plain": "<Figure>"})]),
        new.new_markdown_cell("## A section\n\npasted twice"),
    ]
    result = inspect(lab, _write(cells, OUT / "broken.ipynb"), "selftest-broken")
    found = sorted((kind, what.split(":")[0]) for kind, what in result["findings"])
    assert found == [("broken image", "cell 0"), ("broken image", "cell 6"),
                     ("error output", "cell 1"), ("formula not typeset", "cell 0"),
                     ("leaked warning", "cell 2"), ("log wall", "cell 3"), ("log wall", "cell 4"),
                     ("repeated heading", "cell 7"), ("widget not rendered", "cell 5")], problems(result)


def test_a_live_widget_and_figure_render(lab):
    new = nbformat.v4
    cells = [new.new_code_cell("import ipywidgets\nipywidgets.IntSlider(value=3, description='live')"),
             new.new_code_cell("import matplotlib.pyplot as plt\nplt.plot([1, 3, 2]); plt.show()")]
    result = inspect(lab, _write(cells, OUT / "live.ipynb"), "selftest-live", run=True)
    assert not result["findings"], problems(result)
    assert (result["executed"], result["widgets"], result["images"]) == (2, 1, 1), result


EXECUTED_NOTEBOOKS = sorted(EXECUTED.glob("*.ipynb"))


def test_there_are_executed_notebooks():
    assert EXECUTED_NOTEBOOKS, f"no executed notebook in {EXECUTED}: run make reproduce first"


@pytest.mark.parametrize("notebook", EXECUTED_NOTEBOOKS, ids=lambda p: p.stem)
def test_an_executed_notebook_reads_cleanly(lab, notebook):
    result = inspect(lab, notebook, f"executed-{notebook.stem}")
    assert not result["findings"], problems(result)
    assert result["executed"] == result["code"], "a cell of the executed copy never ran"


def test_the_source_notebook_00_reads_cleanly(lab):
    result = inspect(lab, SOURCE, "source-00_theory")
    assert not result["findings"], problems(result)
    assert result["formulas"] > 10, "the theory notebook's formulas were not typeset"


def test_notebook_00_runs_on_the_lab_kernel(lab):
    """A copy of 00 (figures to results/browser/, not over the study's), run by Run > Run All
    Cells on the server's kernel, shows its figures and no problem; nothing is saved."""
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    source_hash = hashlib.sha256(SOURCE.read_bytes()).hexdigest()
    nb = parameterize_notebook(load_notebook_node(str(SOURCE)),
                               {"results_root": (OUT / "run-00").relative_to(ROOT).as_posix()})
    copy = OUT / "00_theory.ipynb"
    nbformat.write(nb, copy)
    copy_hash = hashlib.sha256(copy.read_bytes()).hexdigest()
    result = inspect(lab, copy, "run-00_theory", run=True)
    assert not result["findings"], problems(result)
    assert result["executed"] == result["code"], "Run All stopped before the last cell"
    assert result["images"] >= 1 and result["formulas"] > 10, result
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == copy_hash, "the run was saved"
    assert hashlib.sha256(SOURCE.read_bytes()).hexdigest() == source_hash
