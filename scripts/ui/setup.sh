#!/usr/bin/env bash
# Install what the browser tests need: Debian's chromium (apt) and playwright-core (npm) into the host folder.
# Idempotent; prints the node_modules folder to use as NODE_PATH.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../host/env.sh"
if [ ! -x /usr/bin/chromium ]; then
  echo "[ui] installing Debian chromium" >&2
  export DEBIAN_FRONTEND=noninteractive
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  mkdir -p "$TCD_HOST_CACHE"
  { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends chromium; } \
    > "$TCD_HOST_CACHE/chromium-install.log" 2>&1 || { tail -20 "$TCD_HOST_CACHE/chromium-install.log" >&2; exit 1; }
fi
UI_DIR="$TCD_HOST_CACHE/ui-playwright-1.64"
if [ ! -f "$UI_DIR/node_modules/playwright-core/package.json" ]; then
  echo "[ui] installing playwright-core into $UI_DIR" >&2
  mkdir -p "$UI_DIR"
  (cd "$UI_DIR" && npm install --silent --no-audit --no-fund playwright-core@1.64 > npm-install.log 2>&1) \
    || { tail -20 "$UI_DIR/npm-install.log" >&2; exit 1; }
fi
echo "$UI_DIR/node_modules"
