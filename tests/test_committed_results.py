"""Every committed results folder rebuilds from its committed data alone: `make tables`
(python -m dpkd_lib.study.report rebuild) on a copy of ``results/<root>/data`` writes every
committed table of that folder again, identical. A folder with committed data is one whose
numbers the README and docs quote (the cpu pilot now; the cpu and cpu_full studies once their
final run is committed)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: the results folders whose data is in git (results/smoke and test folders are ignored)
_TRACKED = subprocess.run(["git", "ls-files", "results/*/data/design.json"], cwd=ROOT, capture_output=True,
                          text=True).stdout.split()
COMMITTED = sorted((ROOT / p).parent.parent for p in _TRACKED)


@pytest.mark.parametrize("folder", COMMITTED, ids=[p.name for p in COMMITTED])
def test_committed_tables_rebuild_from_the_committed_data(folder, tmp_path):
    copy = tmp_path / folder.name
    shutil.copytree(folder / "data", copy / "data")
    done = subprocess.run([sys.executable, "-m", "dpkd_lib.study.report", "rebuild", str(copy)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    committed = sorted((folder / "tables").iterdir())
    assert committed, f"{folder}: data but no tables"
    for table in committed:
        rebuilt = copy / "tables" / table.name
        assert rebuilt.exists(), f"{table.name} is committed but the data no longer makes it"
        assert rebuilt.read_text() == table.read_text(), f"{folder.name}/tables/{table.name} differs from its rebuild"


@pytest.mark.parametrize("folder", COMMITTED, ids=[p.name for p in COMMITTED])
def test_each_objective_alone_trains_at_the_rate_its_committed_pilot_chose(folder):
    """The params follow their pilot: every arm-(b) method whose objective the committed
    learning-rate grid covered trains at the grid's best rate on the declared readout
    (pilot.lr_grid.choose_on), read from the committed per-run data, not from a table."""
    import json
    from dpkd_lib.study import driver, report
    design = json.loads((folder / "data" / "design.json").read_text())
    main = driver.load_params(ROOT / "params", design["profile"], "01_gpt2_120m")
    grid = (main.get("pilot") or {}).get("lr_grid")
    pf = report.pilot_frame(folder)
    if not grid or not (pf["stage"] == "lr_grid").any():
        pytest.skip(f"{folder.name}: no learning-rate grid in its data")
    rates = report.pilot_rates(pf, grid, main["arms"])
    chosen = rates[rates["as chosen"].notna()]
    assert len(chosen) >= len(grid["methods"])
    assert chosen["as chosen"].all(), rates.to_string()
