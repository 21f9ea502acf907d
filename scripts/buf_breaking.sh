#!/usr/bin/env bash
# Breaking-change check of protos/ against the previous commit that had them (skipped when none had).
set -euo pipefail
cd "$(dirname "$0")/.."
base=$(git rev-list -1 HEAD~1 -- protos 2>/dev/null || true)
if [ -z "$base" ]; then
  echo "buf breaking: no earlier commit with protos/; nothing to compare"
  exit 0
fi
echo "buf breaking: against $base"
.venv/bin/buf breaking --against ".git#ref=$base"
