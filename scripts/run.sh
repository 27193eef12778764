#!/usr/bin/env bash
# Runs main.py on the default config (set-up included):
#   scripts/run.sh [WORKDIR] [extra main.py flags, e.g. --config.mode=finetune]
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
WORKDIR="${1:-runs/default}"
shift || true
exec "$VENV/bin/python" main.py --config configs/default.py --workdir "$WORKDIR" "$@"
