"""Registry metadata checked against the Comfy Registry's documented rules, and a ComfyUI-Manager style install:
fresh clone into custom_nodes, `pip install -r requirements.txt`, server start -> every node present, no import error.
"""
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import comfyhost

REPO = Path(__file__).resolve().parents[2]


def load_pyproject():
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_pyproject_follows_registry_rules():
    data = load_pyproject()
    project, comfy = data["project"], data["tool"]["comfy"]
    name = project["name"]
    # name: < 100 chars, alphanumerics - _ . only, no consecutive specials, starts with a letter, no "ComfyUI"
    assert len(name) < 100 and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*", name), name
    assert "comfyui" not in name.lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])             # semantic X.Y.Z
    lic = project["license"]
    assert isinstance(lic, dict) and (lic.get("text") or (REPO / lic.get("file", "")).is_file())
    assert project["urls"]["Repository"].startswith("https://")
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", comfy["PublisherId"])
    assert comfy["DisplayName"].strip()
    assert re.match(r"https://.+\.(png|jpg|jpeg|svg|gif|webp)$", comfy["Icon"])
    assert (REPO / "web" / "icon.png").is_file()                            # what the Icon URL points at
    assert all((REPO / inc).exists() for inc in comfy.get("includes", []))
    assert "description" in project and len(project["description"]) > 20


def test_comfyui_parses_the_pyproject(pack):
    from comfy_config import config_parser
    cfg = config_parser.extract_node_configuration(str(REPO))
    assert cfg.project.name == load_pyproject()["project"]["name"]
    assert cfg.tool_comfy.publisher_id and cfg.tool_comfy.display_name and cfg.tool_comfy.icon
    assert cfg.project.supported_comfyui_version.startswith(">=")


def test_requirements_never_pull_torch():
    reqs = [ln.split("#")[0].strip() for ln in (REPO / "requirements.txt").read_text().splitlines()]
    names = {re.split(r"[<>=!~\[; ]", r)[0].lower() for r in reqs if r}
    assert names and not names & {"torch", "torchvision", "torchaudio", "xformers", "spandrel"}
    deps = {re.split(r"[<>=!~\[; ]", d)[0].lower() for d in load_pyproject()["project"]["dependencies"]}
    assert not deps & {"torch", "torchvision", "torchaudio"}


def test_manager_style_install_loads_every_node(tmp_path, comfyui_path):
    base = tmp_path / "base"
    custom_nodes = base / "custom_nodes"
    custom_nodes.mkdir(parents=True)
    dest = custom_nodes / "comfyui-tcd-suite"
    if (REPO / ".git").exists():   # what the Manager does: git clone (the committed tree, nothing local)
        subprocess.run(["git", "clone", "-q", str(REPO), str(dest)], check=True)
    else:
        subprocess.run(["cp", "-r", str(REPO), str(dest)], check=True)
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", str(dest / "requirements.txt")],
                         capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr[-2000:]
    server = comfyhost.ComfyServer(base, comfyui_path, link_pack=False)
    with server:
        info = server.get("/object_info")
        log = server.log_tail(10 ** 6)
    expected = set(_node_ids(dest))
    assert expected and expected <= set(info), expected - set(info)
    pack_lines = [ln for ln in log.splitlines() if ln.rstrip().endswith("custom_nodes/comfyui-tcd-suite")]
    assert pack_lines and not any("IMPORT FAILED" in ln for ln in pack_lines), pack_lines
    assert not [ln for ln in log.splitlines() if "Cannot import" in ln and "comfyui-tcd-suite" in ln]


def _node_ids(pack_dir):
    """Node ids declared in nodes/__init__.py's NODE_CLASS_MAPPINGS (read as text: no import outside ComfyUI)."""
    text = (pack_dir / "nodes" / "__init__.py").read_text()
    block = text[text.index("NODE_CLASS_MAPPINGS = {"):]
    block = block[:block.index("}")]
    return re.findall(r'"([A-Za-z0-9_]+)":', block)
