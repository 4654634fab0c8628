#!/usr/bin/env bash
# The test command: install shardmerge with its test dependencies into .venv, then run the suite.
# torch is pinned to the CPU wheel first so nothing later pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
.venv/bin/ruff check .  # lint rules: [tool.ruff] in pyproject.toml
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
