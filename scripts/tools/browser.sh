#!/usr/bin/env bash
# Make sure Debian's headless Chromium is installed for the browser tests (tests/browser/), which drive it
# with Playwright through its executable path: Playwright's own browser builds are never downloaded.
# Idempotent: does nothing when a chromium binary is already on PATH. Prints the binary's path.
set -euo pipefail

find_chromium() { command -v chromium || command -v chromium-browser || true; }

binary=$(find_chromium)
if [ -z "$binary" ]; then
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "browser.sh: chromium is missing and cannot be installed here (needs root and apt-get)" >&2
    exit 1
  fi
  printf '==> %s\n' "installing Debian's chromium for the browser tests" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >&2
  binary=$(find_chromium)
fi
echo "$binary"
