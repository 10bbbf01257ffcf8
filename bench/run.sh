#!/usr/bin/env bash
# Every benchmark, then the report (bench/results/README.md and its charts).
# Needs PostgreSQL and Redis (the local ones by default, see bench/peers.py) and
# `pip install -e '.[bench]'`; rclone from the system if it is to be compared.
set -euo pipefail
cd "$(dirname "$0")/.."
python bench/peers.py "$@"
python bench/scale.py
python bench/aimd.py
python bench/scheduler.py
python bench/profile_worker.py
python bench/report.py
