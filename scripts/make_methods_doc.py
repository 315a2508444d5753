"""Assemble docs/methods.md from docs/_sections/*.md and experiment summaries.

Usage (from the repository root, after running the experiments whose commands it prints):

    python scripts/make_methods_doc.py --main runs/tuned-uci --findings docs/_sections/findings_uci.md \\
        --extra runs/tuned-avd docs/_sections/results_av_digits.md
    python scripts/make_methods_doc.py --options-only     # after changing a method's options

The folder must hold ``summary_table.md`` (``mmbalance summarize``) and ``command.txt`` (the
exact command that produced it; ``mmbalance tune`` / ``experiment`` write both), so the page
shows tables only together with the command that made them.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPTIONS_BLOCK = re.compile(r"<!-- options:(\w+) -->.*?<!-- /options -->", re.S)
SECTIONS = ["arl", "mla", "mie", "sample_valuation", "modality_valuation",  # the four papers
            "ogm_ge", "qmf", "pmr", "agm", "gblending", "mslr", "mses", "greedy",  # their baselines
            "ensemble", "unimodal_pretrain", "umt",  # strong simple baselines
            "mmpareto", "reconboost", "opm", "inforeg", "dr", "lfm", "dgl", "mmcosine", "domfn"]  # newer methods


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--main", type=Path, help="a tuning folder (mmbalance tune) or experiment folder")
    ap.add_argument("--findings", type=Path, help="a Markdown file with the reading of the table")
    ap.add_argument("--extra", nargs=2, action="append", type=Path, metavar=("FOLDER", "TEMPLATE"),
                    help="another results section: a tuning/experiment folder and a Markdown template "
                         "with {{TABLE}}, {{COMMAND}} and {{BUDGET}} (may be repeated)")
    ap.add_argument("--options-only", action="store_true",
                    help="only regenerate the option tables in the existing docs/methods.md")
    args = ap.parse_args()
    if args.options_only:
        page = ROOT / "docs" / "methods.md"
        page.write_text(refresh_options(page.read_text()))
        print("refreshed the option tables of docs/methods.md")
        return
    if args.main is None:
        ap.error("--main is required (or --options-only)")
    sec = ROOT / "docs" / "_sections"
    text = fill(ROOT / "docs" / "_sections" / "00_intro.md", args.main, "MAIN_")
    text = text.replace("{{MAIN_FINDINGS}}", args.findings.read_text().strip() if args.findings else "")
    extra = [fill(template, folder, "") for folder, template in (args.extra or [])]
    text = text.replace("{{EXTRA}}", "\n\n".join(e.strip() for e in extra))
    parts = [text.rstrip()]
    for name in SECTIONS:
        body = (sec / f"{name}.md").read_text().strip()
        head, _, rest = body.partition("\n")
        parts.append(f"{head}\n\n{options_block(name)}\n{rest}")
    (ROOT / "docs" / "methods.md").write_text(refresh_options("\n\n".join(parts) + "\n"))
    print("wrote docs/methods.md")


def fill(template: Path, folder: Path, prefix: str) -> str:
    """``template`` with ``{{<prefix>TABLE}}``, ``{{<prefix>COMMAND}}`` and ``{{BUDGET}}`` taken
    from a tuning or experiment folder."""
    import json

    table = (folder / "summary_table.md").read_text().strip()
    command = (folder / "final" / "command.txt" if (folder / "final" / "command.txt").exists()
               else folder / "command.txt").read_text().strip()
    budget = "the method's defaults only"
    if (folder / "tuning.json").exists():
        t = json.loads((folder / "tuning.json").read_text())
        budget = (f"{t['trials_per_method']} trials per method (the defaults plus {t['trials_per_method'] - 1} "
                  f"random draw(s), tuning seed {t['tune_seed']}, search runs with seed {t['search_seed']})")
    return (template.read_text().replace(f"{{{{{prefix}TABLE}}}}", table)
            .replace(f"{{{{{prefix}COMMAND}}}}", command).replace("{{BUDGET}}", budget))


def options_block(method: str) -> str:
    """The generated options table of a method, between markers that :func:`refresh_options`
    (and ``tests/test_docs.py``) recognise."""
    from mmbalance.methods import get_method_class
    from mmbalance.options import options_markdown

    return (f"<!-- options:{method} -->\nOptions (generated from the code by `scripts/make_methods_doc.py`; "
            f"also `mmbalance list methods {method}`):\n\n{options_markdown(get_method_class(method))}\n"
            "<!-- /options -->\n")


def refresh_options(text: str) -> str:
    """``text`` with every options block regenerated from the current code."""
    return OPTIONS_BLOCK.sub(lambda m: options_block(m.group(1)).rstrip("\n"), text)


if __name__ == "__main__":
    main()
