"""Every UI-format example workflow loads in ComfyUI's real frontend (Debian chromium driven by playwright-core)
with zero missing nodes and zero page errors; the frontend's own API conversion (graphToPrompt) equals the
matching workflows/api file up to seeds and model names; /workflow_templates lists them. The screenshots it takes
are the README's (docs/screenshots/): `make docs-assets` refreshes them, a plain run writes them to a temp folder."""
import json
import os
import subprocess
from pathlib import Path

import pytest

from support import workflows
from support.artifacts import artifact_path

REPO = Path(__file__).resolve().parents[2]
SHOTS = artifact_path(REPO / "docs" / "screenshots")


@pytest.fixture(scope="module")
def node_modules():
    out = subprocess.run(["bash", str(REPO / "scripts" / "ui" / "setup.sh")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


@pytest.fixture(scope="module")
def frontend_check(server, node_modules, tmp_path_factory):
    items = [{"name": name, "ui": str(path)} for name, path in workflows.ui_workflows().items()]
    job = tmp_path_factory.mktemp("ui") / "job.json"
    job.write_text(json.dumps({"url": server.url, "mode": "check", "items": items, "screenshot_dir": str(SHOTS)}))
    out = subprocess.run(["node", str(REPO / "scripts" / "ui" / "frontend.mjs"), str(job)], capture_output=True,
                         text=True, timeout=900, env=dict(os.environ, NODE_PATH=node_modules))
    assert out.returncode == 0, out.stderr[-3000:]
    return {r["name"]: r for r in json.loads(out.stdout)["results"]}


def test_template_browser_lists_the_workflows(server):
    listed = server.get("/workflow_templates")
    ours = next((v for k, v in listed.items() if "tcd" in k), None)
    assert ours is not None, listed
    assert set(workflows.ui_workflows()) <= set(ours)


@pytest.mark.parametrize("name", sorted(workflows.ui_workflows()))
def test_ui_workflow_loads_without_missing_nodes_or_errors(frontend_check, name):
    result = frontend_check[name]
    assert result["missing"] == [], f"{name}: node types unknown to the frontend: {result['missing']}"
    assert result["page_errors"] == [], result["page_errors"]
    assert (SHOTS / f"{name}.png").stat().st_size > 10_000


@pytest.mark.parametrize("name", sorted(workflows.ui_workflows()))
def test_frontend_conversion_equals_api_file(frontend_check, name):
    api = workflows.api_workflows()[name]
    assert workflows.normalised(frontend_check[name]["prompt"]) == workflows.normalised(api)
