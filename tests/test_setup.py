"""Set-up files agree with each other: environment.yml pins == requirements.txt pins."""
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def requirement_lines():
    return [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def test_environment_yml_matches_requirements():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert pip == requirement_lines()
    assert "python=3.11" in env["dependencies"]


def test_torch_pinned_first():
    lines = requirement_lines()
    assert lines[0] == "torch==2.13.0"
    assert not any(line.startswith("kernels") for line in lines), "kernels makes bitsandbytes try the hub"


def test_makefile_targets_depend_on_setup():
    text = (ROOT / "Makefile").read_text()
    for target in ("test", "reproduce", "lab", "bench"):
        assert re.search(rf"^{target}: setup", text, re.M), target
    assert re.search(r"^clean:", text, re.M)
