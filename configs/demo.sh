#!/usr/bin/env bash
# Quickstart demo: install shardmerge into .venv, generate a tiny model + adapter, merge, verify.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e .
.venv/bin/python -m shardmerge.demo demo-model
.venv/bin/python -m shardmerge configs/demo.yaml --dry-run
.venv/bin/python -m shardmerge configs/demo.yaml
.venv/bin/python -m shardmerge verify demo-output --plan configs/demo.yaml
