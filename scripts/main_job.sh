#!/usr/bin/env bash
# The main job from a fresh machine: set up and build, then generate a short
# ListOps set and train a TaylorShift and a softmax encoder on it on the CPU,
# and print the comparison table (experiments/lra/main_job.py).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
python -m experiments.lra.main_job --out "${1:-runs/main}"
