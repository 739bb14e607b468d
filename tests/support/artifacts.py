"""Where tests put what they record for the docs (screenshots, the bad-input matrix).

Tests never rewrite tracked files: by default these land in a fresh temporary folder. `make docs-assets` sets
TCD_UPDATE_DOCS=1 so that the same tests refresh the copies under docs/ and benchmarks/results/."""
import os
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def updating_docs() -> bool:
    return os.environ.get("TCD_UPDATE_DOCS") == "1"


def artifact_path(tracked: Path) -> Path:
    """`tracked` (a path inside the repository) when refreshing the docs, else the same name in a temp folder."""
    if updating_docs():
        return tracked
    scratch = Path(tempfile.mkdtemp(prefix="tcd-artifacts-"))
    return scratch / tracked.relative_to(REPO)
