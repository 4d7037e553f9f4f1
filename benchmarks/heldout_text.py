"""Write a second English text, unlike the default news text, for re-measuring results on text never calibrated on.

Run:  python benchmarks/heldout_text.py [OUT]          (default: results/enwiki.txt, about 350k words)
      python benchmarks/spinquant.py --eval-data benchmarks/results/enwiki.txt

The source is the shortened English Wikipedia dump that ships with gensim's test data (read as a file, gensim is not
imported). Only article prose is kept: lines of 200 characters or more that are not templates, tables, headings or
lists, with link markup reduced to its text and references dropped. Crude, but identical for every model compared.
"""

from __future__ import annotations

import bz2
import re
import sys
from pathlib import Path

from lowbit.data import default_text_path

DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"  # beside the default text
MARKUP_STARTS = "{|[=<*!:#&}"
LINK = re.compile(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]")  # [[target|text]] -> text
TEMPLATE = re.compile(r"\{\{[^}]*\}\}")
REFERENCE = re.compile(r"&lt;ref.*?&lt;/ref&gt;|&lt;ref[^&]*/&gt;")
ENTITY = re.compile(r"&[a-z]+;")


def dump_path() -> Path:
    """The dump in gensim's test data, found the way lowbit finds the default text (with its errors if gensim is missing)."""
    path = default_text_path().with_name(DUMP)
    if not path.is_file():
        sys.exit(f"{path} is missing from the gensim package: reinstall it with `pip install --no-deps gensim`")
    return path


def prose(line: str) -> str | None:
    """The article text of one dump line, or None for markup and short lines."""
    line = line.strip()
    if len(line) < 200 or line[0] in MARKUP_STARTS:
        return None
    line = ENTITY.sub("", REFERENCE.sub("", TEMPLATE.sub("", LINK.sub(r"\1", line))))
    line = line.replace("'''", "").replace("''", "")
    return None if "|" in line else line


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "results" / "enwiki.txt"
    with bz2.open(dump_path(), "rt", encoding="utf-8") as f:
        paragraphs = [p for p in map(prose, f) if p]
    out.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    print(f"{out}: {len(paragraphs)} paragraphs, {sum(len(p.split()) for p in paragraphs)} words")


if __name__ == "__main__":
    main()
