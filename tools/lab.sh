#!/bin/sh
# JupyterLab on this repo, as `make lab` starts it; tests/test_setup.py starts this same script.
# --allow-root: containers usually run as root, and jupyter refuses to start as root without it.
# --no-browser: there is often none; open the URL the server prints (it carries the token).
# LAB_PYTHON: the venv's python (default .venv/bin/python); further arguments go to jupyter lab.
set -e
cd "$(dirname "$0")/.."
exec "${LAB_PYTHON:-.venv/bin/python}" -m jupyter lab --notebook-dir=. --allow-root --no-browser "$@"
