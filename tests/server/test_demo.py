"""`make demo` as the README tells a new user to run it: the embedded tiny model through a real headless server, a
PNG written where OUT points, whether OUT names a file or a folder (make passes OUT from the environment, where it
often names a folder)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_demo(out: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py"), "--out", out], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env=dict(os.environ))


@pytest.mark.parametrize("form", ["folder", "folder/", "file"])
def test_demo_writes_a_png_where_out_points(tmp_path, form):
    target = tmp_path / "pictures"
    if form == "folder":
        target.mkdir()
        out, expected = str(target), target / "tcd_demo.png"
    elif form == "folder/":
        out, expected = str(target) + "/", target / "tcd_demo.png"
    else:
        out, expected = str(tmp_path / "cat.png"), tmp_path / "cat.png"
    done = run_demo(out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert expected.read_bytes()[:8] == PNG_MAGIC
    assert f"wrote {expected}" in done.stdout
    assert not list(expected.parent.glob("*.tmp"))
