#!/usr/bin/env bash
# Validate an AsyncAPI document (default docs/asyncapi.yaml) with @asyncapi/parser run by node.
# The parser is installed with npm into a cache dir the first time (pinned in scripts/tools/package.json)
# and reused afterwards; any error, warning, information or hint fails the check.
#
# Environment (optional):
#   KAFKA_SAGA_TOOLS_DIR  where the node packages are installed (~/.cache/kafka-saga/tools)
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
DOC="${1:-$ROOT/docs/asyncapi.yaml}"
TOOLS_DIR="${KAFKA_SAGA_TOOLS_DIR:-${HOME:-/root}/.cache/kafka-saga/tools}"

command -v node >/dev/null || { echo "asyncapi.sh: node is required (Node.js 18 or newer)" >&2; exit 1; }
command -v npm >/dev/null || { echo "asyncapi.sh: npm is required" >&2; exit 1; }

if ! cmp -s "$SCRIPT_DIR/package.json" "$TOOLS_DIR/package.json" \
    || [ ! -f "$TOOLS_DIR/node_modules/@asyncapi/parser/package.json" ]; then
  echo "asyncapi.sh: installing @asyncapi/parser into $TOOLS_DIR" >&2
  mkdir -p "$TOOLS_DIR"
  cp "$SCRIPT_DIR/package.json" "$TOOLS_DIR/package.json"
  (cd "$TOOLS_DIR" && npm install --no-audit --no-fund --loglevel=error >&2)
fi

NODE_PATH="$TOOLS_DIR/node_modules" node "$SCRIPT_DIR/asyncapi-validate.cjs" "$DOC"
