#!/usr/bin/env bash
# `make demo`: the main job on an embedded default. Runs what exists of the pipeline on the tiny
# CPU config; needs no network beyond the package install.
set -euo pipefail
venv=${1:-.venv}
"$venv/bin/maestro" info configs/demo.yaml
