"""Assemble docs/methods.md from docs/_sections/*.md and experiment summaries.

Usage (from the repository root, after running the experiments whose commands it prints):

    python scripts/make_methods_doc.py --main runs/methods-uci --ablations runs/ablations-uci

Each experiment folder must hold ``summary.md`` and ``command.txt`` (the exact command that
produced it; ``mmbalance experiment`` writes both), so the page shows tables only together with
the command that made them.
"""
from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ["arl", "mla", "mie", "sample_valuation", "modality_valuation", "ogm_ge", "qmf", "pmr", "agm",
            "gblending", "mslr", "mses", "greedy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--main", type=Path, required=True)
    ap.add_argument("--ablations", type=Path, required=True)
    args = ap.parse_args()
    sec = ROOT / "docs" / "_sections"
    text = (sec / "00_intro.md").read_text()
    for key, folder in (("MAIN", args.main), ("ABLATION", args.ablations)):
        text = text.replace("{{%s_TABLE}}" % key, (folder / "summary.md").read_text().strip())
        text = text.replace("{{%s_COMMAND}}" % key, (folder / "command.txt").read_text().strip())
    parts = [text.rstrip()]
    for name in SECTIONS:
        parts.append((sec / f"{name}.md").read_text().strip())
    (ROOT / "docs" / "methods.md").write_text("\n\n".join(parts) + "\n")
    print("wrote docs/methods.md")


if __name__ == "__main__":
    main()
