"""docs/bad_inputs.md lists exactly the cases of tests/server/test_hardening.py, with the messages the real server
returned (benchmarks/results/bad_input_matrix.json, refreshed by `make docs-assets`)."""
import ast
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import bad_inputs_doc  # noqa: E402


def hardening_case_ids() -> list[str]:
    """The first argument of every Case(...) in the hardening test's CASES table, read from its source."""
    tree = ast.parse((REPO / "tests" / "server" / "test_hardening.py").read_text())
    table = next(n.value for n in tree.body if isinstance(n, ast.Assign)
                 and any(isinstance(t, ast.Name) and t.id == "CASES" for t in n.targets))
    return [call.args[0].value for call in table.elts if isinstance(call, ast.Call)]


def test_doc_rows_are_the_hardening_cases_and_the_matrix_cases():
    doc_cases = bad_inputs_doc.documented_cases(bad_inputs_doc.DOC.read_text())
    matrix_cases = [c["case"] for c in json.loads(bad_inputs_doc.MATRIX.read_text())["cases"]]
    ids = hardening_case_ids()
    assert len(ids) >= 40 and len(doc_cases) == len(set(doc_cases))
    assert set(ids) <= set(doc_cases), sorted(set(ids) - set(doc_cases))
    assert set(doc_cases) == set(matrix_cases), sorted(set(doc_cases) ^ set(matrix_cases))


def test_doc_messages_are_the_measured_messages():
    assert bad_inputs_doc.main(["--check"]) == 0, "run: python scripts/bad_inputs_doc.py (or make docs-assets)"
