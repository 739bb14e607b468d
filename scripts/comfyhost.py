"""Start / stop a headless ComfyUI on loopback with this pack installed, and talk to it over HTTP (stdlib only).

Used by `make demo`, the tests and the benchmarks. The server runs with `--cpu` (unless TCD_HOST_GPU=1), a
private `--base-directory` (models/, custom_nodes/, input/, output/ ...), an in-memory database and a free port;
the pack is linked into its custom_nodes folder under PACK_NAME.

    with ComfyServer(base_dir, comfyui_dir, python) as srv:
        result = srv.run_prompt(api_graph)          # -> {"prompt_id", "outputs", "images": [bytes...], "seconds"}
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACK_NAME = "comfyui-tcd-suite"


class PromptRejected(Exception):
    """/prompt answered 400: the graph did not validate. `.body` holds ComfyUI's error JSON."""

    def __init__(self, body: dict):
        self.body = body
        super().__init__(json.dumps(body)[:2000])


class PromptFailed(Exception):
    """The prompt ran and failed. `.messages` holds ComfyUI's status messages (execution_error ...)."""

    def __init__(self, prompt_id: str, status: dict):
        self.prompt_id = prompt_id
        self.status = status
        self.messages = status.get("messages", [])
        err = next((m[1] for m in self.messages if m[0] in ("execution_error", "execution_interrupted")), {})
        self.error = err
        super().__init__(f"{err.get('node_type', '?')}: {err.get('exception_message', status)}"[:2000])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_base(base: Path, pack_dir: Path = REPO) -> Path:
    for sub in ("custom_nodes", "input", "output", "temp", "user", "models/checkpoints", "models/loras",
                "models/vae", "models/diffusion_models", "models/text_encoders"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_NAME
    if link.is_symlink() or link.exists():
        if link.resolve() != pack_dir.resolve():
            link.unlink() if link.is_symlink() else shutil.rmtree(link)
    if not link.exists():
        link.symlink_to(pack_dir.resolve(), target_is_directory=True)
    return base


class ComfyServer:
    def __init__(self, base: Path, comfyui_dir: Path, python: str = sys.executable, port: int | None = None,
                 pack_dir: Path = REPO, extra_args: tuple = (), timeout: float = 180.0, link_pack: bool = True):
        self.base = Path(base)
        self.comfyui_dir = Path(comfyui_dir)
        self.python = python
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.pack_dir = pack_dir
        self.extra_args = tuple(extra_args)
        self.timeout = timeout
        self.link_pack = link_pack
        self.proc: subprocess.Popen | None = None
        self.log_path = self.base / "server.log"
        self.ready_seconds = None

    # ------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> "ComfyServer":
        if self.link_pack:
            prepare_base(self.base, self.pack_dir)
        else:
            (self.base / "custom_nodes").mkdir(parents=True, exist_ok=True)
        cmd = [self.python, "main.py", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--dont-print-server", "--base-directory", str(self.base),
               "--database-url", "sqlite:///:memory:", "--disable-api-nodes", "--preview-method", "none"]
        if os.environ.get("TCD_HOST_GPU") != "1":
            cmd.append("--cpu")
        cmd += list(self.extra_args)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        t0 = time.time()
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=self.comfyui_dir, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        while True:
            try:
                with urllib.request.urlopen(self.url + "/object_info/KSampler", timeout=5) as r:
                    r.read()
                break
            except Exception:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"ComfyUI exited during startup (code {self.proc.returncode}):\n"
                                       + self.log_tail())
                if time.time() - t0 > self.timeout:
                    self.stop()
                    raise RuntimeError(f"ComfyUI not ready after {self.timeout}s:\n" + self.log_tail())
                time.sleep(0.2)
        self.ready_seconds = time.time() - t0
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()
        self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    # ------------------------------------------------------------------------------------------- HTTP
    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            data = r.read()
            return json.loads(data) if r.headers.get_content_type() == "application/json" else data

    def post(self, path: str, payload, timeout: float = 30):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
            return json.loads(body) if body else None

    def queue(self, graph: dict) -> str:
        try:
            return self.post("/prompt", {"prompt": graph, "client_id": uuid.uuid4().hex})["prompt_id"]
        except urllib.error.HTTPError as e:
            if e.code == 400:
                raise PromptRejected(json.loads(e.read().decode() or "{}")) from None
            raise

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        t0 = time.time()
        while True:
            h = self.get(f"/history/{prompt_id}")
            if prompt_id in h and h[prompt_id].get("status", {}).get("completed") is not None:
                return h[prompt_id]
            if not self.alive():
                raise RuntimeError("ComfyUI died while running a prompt:\n" + self.log_tail())
            if time.time() - t0 > timeout:
                raise TimeoutError(f"prompt {prompt_id} not finished after {timeout}s")
            time.sleep(0.1)

    def fetch_image(self, image: dict) -> bytes:
        q = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
        return self.get("/view?" + q)

    def run_prompt(self, graph: dict, timeout: float = 600) -> dict:
        """Queue, wait, fetch every output image. Raises PromptRejected / PromptFailed with ComfyUI's message."""
        t0 = time.time()
        pid = self.queue(graph)
        entry = self.wait(pid, timeout)
        if entry["status"].get("status_str") != "success":
            raise PromptFailed(pid, entry["status"])
        images = [im for out in entry["outputs"].values() for im in out.get("images", [])]
        return {"prompt_id": pid, "outputs": entry["outputs"], "image_refs": images,
                "images": [self.fetch_image(im) for im in images], "seconds": time.time() - t0,
                "status": entry["status"]}

    def upload_image(self, name: str, png: bytes, subfolder: str = "", kind: str = "input") -> dict:
        boundary = uuid.uuid4().hex
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                 for k, v in (("subfolder", subfolder), ("type", kind), ("overwrite", "true"))]
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                     f'Content-Type: image/png\r\n\r\n'.encode() + png + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        req = urllib.request.Request(self.url + "/upload/image", data=body,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def interrupt(self) -> None:
        self.post("/interrupt", {})


def comfy_in_process(comfyui_dir: Path, pack_dir: Path = REPO):
    """Import ComfyUI into this process as main.py would (CPU unless TCD_HOST_GPU=1), initialise core + extra nodes
    and load the pack through ComfyUI's own custom-node loader. Returns the pack module as ComfyUI registered it."""
    import asyncio
    root = str(Path(comfyui_dir).resolve())
    if root not in sys.path:
        sys.path.insert(0, root)
    from comfy.cli_args import args
    args.cpu = os.environ.get("TCD_HOST_GPU") != "1"   # before the first comfy.model_management import
    import comfy.model_management  # noqa: F401
    # ComfyUI's `utils` package must be imported before `nodes` puts comfy/ (which has a utils.py) first on
    # sys.path; main.py does the same by importing utils.extra_config first.
    import utils.extra_config  # noqa: F401
    import utils.install_util  # noqa: F401
    import server  # noqa: F401  (comfy_extras nodes use PromptServer)
    import nodes
    if "SamplerCustomAdvanced" not in nodes.NODE_CLASS_MAPPINGS:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    module_name = str(pack_dir).replace(".", "_x_")
    if module_name not in sys.modules:
        if not asyncio.run(nodes.load_custom_node(str(pack_dir))):
            raise RuntimeError(f"the pack at {pack_dir} failed to load into ComfyUI")
    return sys.modules[module_name]


def make_tiny_flow_models(comfyui_dir: Path, out_dir: Path, python: str = sys.executable) -> dict:
    """Write the tiny SD3-class / Flux-class model files (scripts/make_tiny_flow.py) into out_dir's models/ layout
    unless they exist; returns {part: path}."""
    out_dir = Path(out_dir)
    parts = {"sd3_checkpoint": "checkpoints/tiny_sd3.safetensors", "sd3_unet": "diffusion_models/tiny_sd3.safetensors",
             "flux_unet": "diffusion_models/tiny_flux.safetensors", "clip_l": "text_encoders/tiny_clip_l.safetensors",
             "vae": "vae/tiny_taesd16.safetensors"}
    paths = {k: out_dir / v for k, v in parts.items()}
    if not all(p.exists() for p in paths.values()):
        subprocess.run([python, str(REPO / "scripts" / "make_tiny_flow.py"), "--comfyui", str(comfyui_dir),
                        "--out-dir", str(out_dir)], check=True, capture_output=True)
    return paths


def make_tiny_checkpoint(comfyui_dir: Path, out: Path, python: str = sys.executable, extra: tuple = ()) -> Path:
    """Write the tiny real SD1.5 checkpoint (ComfyUI's own classes, random weights) unless it already exists."""
    out = Path(out)
    if not out.exists():
        subprocess.run([python, str(REPO / "scripts" / "make_tiny_sd15.py"), "--comfyui", str(comfyui_dir),
                        "--out", str(out), *extra], check=True, capture_output=True)
    return out
