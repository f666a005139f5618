"""Writes src/model/html_entities.tsv: the HTML5 named character references (WHATWG
list, as Python's html.entities.html5 holds it), one per line: name<TAB>hex code points.
Names without a trailing ';' are the legacy ones browsers accept without it.
Run with any Python 3: python3 scripts/gen_html_entities.py"""
import html.entities
import pathlib

out = pathlib.Path(__file__).resolve().parent.parent / "src" / "model" / "html_entities.tsv"
lines = [
    name + "\t" + " ".join("%x" % ord(c) for c in chars)
    for name, chars in sorted(html.entities.html5.items())
]
out.write_text("\n".join(lines) + "\n", encoding="utf-8")
print(out, len(lines))
