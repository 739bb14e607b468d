"""Fixtures shared by every test level.

Levels (folders): unit/ (the `tcd` core, no ComfyUI), comfy/ (ComfyUI 0.3.75 imported in this process),
server/ (a real ComfyUI server subprocess spoken to over HTTP), ui/ (the real frontend in headless Chromium).
The host comes from scripts/host/setup.sh (`make test` builds it); COMFYUI_DIR points at its ComfyUI.
"""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))               # `import tcd`, `import train` as top-level packages
sys.path.insert(0, str(REPO / "scripts"))   # comfyhost (server + HTTP client)
sys.path.insert(0, str(REPO / "tests"))     # `import support.<helper>`: test helpers shared across levels
import comfyhost  # noqa: E402


def comfyui_dir() -> Path:
    d = os.environ.get("COMFYUI_DIR")
    if not d or not (Path(d) / "main.py").exists():
        pytest.exit("COMFYUI_DIR is not set to a ComfyUI checkout: run the tests with `make test`", returncode=2)
    return Path(d)


@pytest.fixture(scope="session")
def comfyui_path() -> Path:
    return comfyui_dir()


@pytest.fixture(scope="session")
def pack():
    """ComfyUI imported in-process, core + extra nodes initialised and this pack loaded like the server does.

    Returns the pack's module (as ComfyUI registered it)."""
    return comfyhost.comfy_in_process(comfyui_dir(), REPO)


@pytest.fixture(scope="session")
def tiny_ckpt() -> Path:
    """The tiny real SD1.5 checkpoint (generated once per host, ~300 MB, a few seconds)."""
    path = Path(os.environ.get("TINY_CKPT") or (REPO / ".cache" / "tiny_sd15.safetensors"))
    path.parent.mkdir(parents=True, exist_ok=True)
    return comfyhost.make_tiny_checkpoint(comfyui_dir(), path)


@pytest.fixture(scope="session")
def tiny_flow_models() -> dict:
    """The tiny SD3-class / Flux-class model files (scripts/make_tiny_flow.py), generated once per host."""
    out = Path(os.environ.get("TINY_CKPT") or (REPO / ".cache" / "tiny_sd15.safetensors")).parent / "tiny_flow"
    return comfyhost.make_tiny_flow_models(comfyui_dir(), out)


TEST_NODES = REPO / "tests" / "support" / "comfy_nodes" / "tcd_test_models"


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_ckpt, tiny_flow_models):
    """A real ComfyUI server with the pack in custom_nodes, the tiny checkpoints in models/ (SD1.5; SD3 and Flux
    parts) and the test-only tiny Flux loader node (tests/support/comfy_nodes)."""
    base = tmp_path_factory.mktemp("comfy_base")
    comfyhost.prepare_base(base)
    (base / "models" / "checkpoints" / "tiny_sd15.safetensors").symlink_to(tiny_ckpt)
    for path in tiny_flow_models.values():
        (base / "models" / path.parent.name / path.name).symlink_to(path)
    (base / "custom_nodes" / TEST_NODES.name).symlink_to(TEST_NODES, target_is_directory=True)
    srv = comfyhost.ComfyServer(base, comfyui_dir())
    srv.start()
    yield srv
    srv.stop()
