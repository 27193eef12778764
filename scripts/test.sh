#!/usr/bin/env bash
# Runs the whole test suite (set-up included): scripts/test.sh [pytest args]
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
