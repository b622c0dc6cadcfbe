#!/usr/bin/env bash
# The test command (README "Run the tests"): install the project, make sure real Kafka and PostgreSQL
# answer, then run the quality gates and the whole suite.
#
# Services: KAFKA_BOOTSTRAP_SERVERS / SAGA_DATABASE_URL are used as given; whatever is not given is
# started locally by scripts/services.sh (idempotent: it reuses services already running).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '==> %s\n' "$*" >&2; }
start=$(date +%s)

log "installing kafka-saga with its dev extras"
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -e '.[dev]'

if [ -z "${KAFKA_BOOTSTRAP_SERVERS:-}" ] || [ -z "${SAGA_DATABASE_URL:-}" ]; then
  log "starting local Kafka and PostgreSQL (scripts/services.sh start)"
  bash scripts/services.sh start
  eval "$(bash scripts/services.sh env | sed -e 's/^export \([A-Z_]*\)=\(.*\)$/export \1="${\1:-\2}"/')"
fi
export KAFKA_BOOTSTRAP_SERVERS SAGA_DATABASE_URL
bash scripts/tools/browser.sh >/dev/null  # Debian's Chromium for tests/browser (installed when missing)
log "Kafka at $KAFKA_BOOTSTRAP_SERVERS"

log "ruff check"
python3 -m ruff check .
log "ruff format --check"
python3 -m ruff format --check .
log "mypy --strict (saga, broker, storage)"
python3 -m mypy
log "import-linter (saga -> broker | storage)"
python3 -c 'import sys; from importlinter.cli import lint_imports_command; sys.argv[0] = "lint-imports"; sys.exit(lint_imports_command())' --no-cache

log "AsyncAPI document (docs/asyncapi.yaml, @asyncapi/parser)"
bash scripts/tools/asyncapi.sh docs/asyncapi.yaml

log "pytest"
python3 -m pytest -p no:cacheprovider --cov --cov-report=term:skip-covered "$@"
log "test command finished in $(( $(date +%s) - start )) s"
