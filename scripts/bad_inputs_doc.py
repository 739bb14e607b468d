"""Bring docs/bad_inputs.md's tables in line with benchmarks/results/bad_input_matrix.json, the messages the real
server returned in tests/server/test_hardening.py (`make docs-assets` refreshes both; tests/unit/test_bad_inputs_doc.py
checks they agree). Each table row's message column is the matrix's message, with the list of every file in the
server's loras folder shortened to `[the files in models/loras]`.

    python scripts/bad_inputs_doc.py            (rewrites docs/bad_inputs.md)
    python scripts/bad_inputs_doc.py --check    (exit 1 if it is out of date)
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "bad_inputs.md"
MATRIX = REPO / "benchmarks" / "results" / "bad_input_matrix.json"
ROW = re.compile(r"^(\| \d+ \| `(?P<case>[^`]+)` \|.*\| )(?P<message>[^|]*(?:\\\|[^|]*)*) \|$")
LORA_LIST = re.compile(r"not in \[('[^']*'(?:, )?)+\]")


def doc_message(message: str) -> str:
    message = LORA_LIST.sub("not in [the files in models/loras]", message)
    return message.replace("|", "\\|").replace("\n", " ")


def render(doc: str, cases: list[dict]) -> str:
    by_case = {c["case"]: c for c in cases}
    seen, lines = set(), []
    for line in doc.splitlines():
        m = ROW.match(line)
        if m and m.group("case") in by_case:
            seen.add(m.group("case"))
            line = m.group(1) + doc_message(by_case[m.group("case")]["message"]) + " |"
        lines.append(line)
    missing = sorted(set(by_case) - seen)
    if missing:
        raise SystemExit(f"cases in {MATRIX.name} without a row in {DOC.name}: {', '.join(missing)}; add rows for them")
    return "\n".join(lines) + "\n"


def documented_cases(doc: str) -> list[str]:
    return [m.group("case") for m in map(ROW.match, doc.splitlines()) if m]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    doc = DOC.read_text()
    new = render(doc, json.loads(MATRIX.read_text())["cases"])
    if "--check" in argv:
        return 0 if new == doc else 1
    if new != doc:
        tmp = DOC.with_name(DOC.name + ".tmp")
        tmp.write_text(new)
        os.replace(tmp, DOC)
    return 0


if __name__ == "__main__":
    sys.exit(main())
