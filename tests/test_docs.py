"""Documentation generated from the code stays in step with it: the option tables of
docs/methods.md equal what scripts/make_methods_doc.py generates now, every method has a
section, and docstrings cite nothing outside the repository."""
import importlib.util
import re
from pathlib import Path

from mmbalance.methods import list_methods

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("make_methods_doc", ROOT / "scripts" / "make_methods_doc.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_option_tables_are_current():
    page = (ROOT / "docs" / "methods.md").read_text()
    fresh = _script().refresh_options(page)
    assert page == fresh, ("docs/methods.md option tables are stale: run "
                           "python scripts/make_methods_doc.py --options-only")


def test_every_method_has_a_section_with_generated_options():
    page = (ROOT / "docs" / "methods.md").read_text()
    documented = set(re.findall(r"<!-- options:(\w+) -->", page))
    assert documented == set(_script().SECTIONS)
    assert set(list_methods()) - documented <= {"joint", "unimodal"}


def test_docstrings_cite_no_document_outside_the_repository():
    bad = []
    for p in (ROOT / "src" / "mmbalance").rglob("*.py"):
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if re.search(r"specs/|notes/official|shared/", line):
                bad.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not bad, "\n".join(bad)
