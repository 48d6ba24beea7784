#!/usr/bin/env python3
"""Build the embedded corpus ``bitstream/corpora/web.txt.gz`` from the World English Bible.

The package ships this file so that the default runs need no network and no SWORD tools; only this
maintainer script needs Debian's ``sword-text-web`` module and the ``diatheke`` front end::

    apt-get install sword-text-web diatheke
    python scripts/build_web_corpus.py            # writes bitstream/corpora/{web.txt.gz,ORIGIN.md}

Why OSIS and not ``-f plain``: the plain renderer of diatheke 4.8 drops footnotes *and* the space that
surrounded them ("Godcreated", "YahwehGod"), and in range mode it repeats a stale section heading
before every later verse (even raw ``<title>`` markup). The OSIS renderer gives exactly one line per
verse, ``[stale heading]  Book C:V: <osis content>``, so the verse text can be cut out reliably and
every footnote (``<note>``, kept with ``-o f``) replaced by a space.

Cleaning, per verse (output: one verse per line, in canonical order, so consecutive lines read as
running prose -- ``lines_per_document`` groups them into OWT-style documents):

1. drop the stale heading before the verse reference, the reference itself, section titles and notes;
2. strip the remaining OSIS tags (``<w>``, line milestones, poetry ``<l>``/``<lg>``), unescape entities;
3. repair the spacing the notes leave ("Lord, you", no space before punctuation or after an opening
   quote), then normalise typography to ASCII: curly quotes -> straight, em/en dashes, ellipsis,
   accents folded (NFKD);
4. split verses longer than ``--max-chars`` at sentence ends (greedy packing);
5. keep a line only if it is ``--min-chars``..``--max-chars`` long, has at least 4 words, contains only
   ASCII letters/digits/basic punctuation, and does not end inside an unterminated bracket.

The output is gzip with mtime 0, so rebuilding from the same module version is byte-identical.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bitstream" / "corpora" / "web.txt.gz"
MODULE = "engWEB2015eb"
RANGE = "Genesis 1:1-Revelation 22:21"

# A book name as diatheke prints it: "Genesis", "I Samuel", "Song of Solomon", "Esther (Greek)",
# "Revelation of John", "Bel and the Dragon".
_BOOK = r"(?:(?:I|II|III|IV) )?[A-Z][a-z]+(?: (?:of|and|the|to|[A-Z][a-z]+|\([A-Z][a-z]+\)))*"
# The reference that starts a verse; preceded by start of line, whitespace or the end of a tag.
_VERSE_REF = re.compile(r"(?:^|(?<=\s)|(?<=>))(" + _BOOK + r") (\d+):(\d+): ")
_NOTE = re.compile(r"<note\b[^>]*/>|<note\b[^>]*>.*?</note>", re.S)
_TITLE = re.compile(r"<title\b[^>]*>.*?</title>", re.S)
_TAG = re.compile(r"<[^>]+>")
# The companion glossary is appended to Revelation 22:21 in this module; it is not verse text.
_GLOSSARY = "The following words used in the World English Bible"

_ASCII_MAP = {
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u00ab": '"', "\u00bb": '"',
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u02bc": "'",
    "\u2014": " - ", "\u2013": "-", "\u2012": "-", "\u2010": "-", "\u2011": "-",
    "\u2026": "...", "\u00a0": " ", "\u2009": " ", "\u200a": " ", "\u202f": " ",
    "\u00b6": "", "\u200b": "", "\ufeff": "",
}
_ALLOWED = re.compile(r"^[A-Za-z0-9 .,;:!?'\"()\-]+$")
_SENTENCE_END = re.compile(r'(?<=[.!?])["\')]* +(?=["\'(]*[A-Z])')


def run_diatheke(module: str = MODULE, key: str = RANGE) -> str:
    """The whole Bible as OSIS, one verse per line, footnotes kept (``-o f``)."""
    cmd = ["diatheke", "-b", module, "-f", "OSIS", "-o", "f", "-k", key]
    try:
        out = subprocess.run(cmd, capture_output=True, check=True).stdout
    except FileNotFoundError:
        raise SystemExit("diatheke not found: apt-get install diatheke sword-text-web")
    except subprocess.CalledProcessError as err:
        raise SystemExit(f"{' '.join(cmd)} failed ({err.returncode}): {err.stderr.decode()[:500]}")
    return out.decode("utf-8")


def verses(osis: str):
    """Yield ``(book, chapter, verse, osis_content)`` for each verse line of diatheke's OSIS output."""
    for line in osis.splitlines():
        m = _VERSE_REF.search(line)
        if m is None:  # the trailing "(module)" line, blank lines
            continue
        yield m.group(1), int(m.group(2)), int(m.group(3)), line[m.end():]


def osis_to_text(content: str) -> str:
    """Verse OSIS -> plain Unicode text, notes and titles removed, spacing repaired."""
    content = _TITLE.sub(" ", content)
    # A note sits between two words without spaces in this module ("God<note/>created"): replace
    # it by a space, the stray spaces before punctuation are removed below.
    content = _NOTE.sub(" ", content)
    content = _TAG.sub(" ", content).replace("\u2003", " ")
    text = html.unescape(content)
    cut = text.find(_GLOSSARY)
    if cut >= 0:
        text = text[:cut]
    text = re.sub(r"\s+", " ", text).strip()
    # Spacing repairs while opening and closing quotes can still be told apart.
    text = re.sub(r"\s+([.,;:!?\u201d\u2019)\]])", r"\1", text)
    text = re.sub(r"([\u201c\u2018(\[])\s+", r"\1", text)
    return text


def to_ascii(text: str) -> str:
    """Typography -> ASCII; accented letters folded; whatever remains non-ASCII is left for the filter."""
    text = "".join(_ASCII_MAP.get(ch, ch) for ch in text)
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r" +([.,;:!?])", r"\1", text)


def split_long(text: str, max_chars: int) -> list[str]:
    """Split a long verse at sentence ends and pack the sentences greedily into <= max_chars lines."""
    if len(text) <= max_chars:
        return [text]
    out, cur = [], ""
    for sent in _SENTENCE_END.split(text):
        if cur and len(cur) + 1 + len(sent) > max_chars:
            out.append(cur)
            cur = sent
        else:
            cur = f"{cur} {sent}" if cur else sent
    if cur:
        out.append(cur)
    return out


def keep(line: str, min_chars: int, max_chars: int) -> bool:
    if not min_chars <= len(line) <= max_chars or len(line.split()) < 4:
        return False
    if not _ALLOWED.match(line):
        return False
    # Unbalanced brackets are left-overs of cross-verse parentheses; they read as junk on their own.
    return line.count("(") == line.count(")")


def build(osis: str, min_chars: int, max_chars: int) -> tuple[list[str], dict]:
    lines, stats = [], {"verses": 0, "empty": 0, "non_ascii": 0, "too_short": 0, "too_long": 0,
                        "unbalanced": 0, "pieces": 0}
    for _book, _ch, _v, content in verses(osis):
        stats["verses"] += 1
        text = to_ascii(osis_to_text(content))
        if not text:
            stats["empty"] += 1
            continue
        for piece in split_long(text, max_chars):
            stats["pieces"] += 1
            if keep(piece, min_chars, max_chars):
                lines.append(piece)
            elif not _ALLOWED.match(piece):
                stats["non_ascii"] += 1
            elif len(piece) < min_chars or len(piece.split()) < 4:
                stats["too_short"] += 1
            elif len(piece) > max_chars:
                stats["too_long"] += 1
            else:
                stats["unbalanced"] += 1
    return lines, stats


def write_gzip(path: Path, lines: list[str]) -> bytes:
    """Deterministic gzip (mtime 0, no file name in the header); returns the bytes written."""
    raw = ("\n".join(lines) + "\n").encode("ascii")
    data = gzip.compress(raw, compresslevel=9, mtime=0)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return raw


def origin_md(lines: list[str], raw: bytes, gz: bytes, stats: dict, module_version: str,
              min_chars: int, max_chars: int) -> str:
    words = sum(len(line.split()) for line in lines)
    return f"""# Origin of `web.txt.gz`

**What it is.** {len(lines):,} lines of English prose, one Bible verse per line (verses longer than
{max_chars} characters split at sentence ends), in canonical book order (Genesis ... Revelation,
including the deuterocanonical books of the module). {words:,} words, {len(raw):,} bytes
uncompressed, {len(gz):,} bytes gzipped.

**Source.** The World English Bible with Deuterocanon (WEB), SWORD module `{MODULE}` version
{module_version}, Debian package `sword-text-web` (upstream <https://ebible.org/web/>), rendered
with `diatheke -b {MODULE} -f OSIS -o f -k '{RANGE}'`.

**Licence.** The World English Bible is in the public domain (module `Copyright=PUBLIC DOMAIN`,
`DistributionLicense=Public Domain`; Debian copyright file: "The World English Bible is in the Public
Domain. That means that it is not copyrighted."). "World English Bible" is a trademark of eBible.org,
which asks that a *changed* text not be called the World English Bible. This file is changed (notes,
headings and references removed, typography folded to ASCII, lines filtered), so it is a corpus
*derived from* the WEB, not the WEB itself.

**How it was built.** `python scripts/build_web_corpus.py` (see its docstring): per verse, drop the
heading diatheke repeats before the reference, the reference, section titles and footnotes
(a footnote is replaced by a space because this module glues the neighbouring words together), strip
OSIS tags, repair spacing, fold curly quotes / dashes / ellipses / accents to ASCII, cut the
companion glossary appended to Revelation 22:21, split verses over {max_chars} characters at
sentence ends, and keep lines of {min_chars}-{max_chars} characters with at least 4 words made of
ASCII letters, digits, spaces and `.,;:!?'"()-` with balanced parentheses.
Verses read: {stats['verses']:,}; empty: {stats['empty']:,}; pieces dropped as non-ASCII:
{stats['non_ascii']:,}, too short: {stats['too_short']:,}, too long: {stats['too_long']:,},
unbalanced brackets: {stats['unbalanced']:,}. The gzip stream has mtime 0, so a rebuild from the
same module version is byte-identical.

**Checksums.**
- `web.txt.gz` sha256 `{hashlib.sha256(gz).hexdigest()}`
- uncompressed text sha256 `{hashlib.sha256(raw).hexdigest()}`
- lines: {len(lines)}

**Use.** `corpus.source: builtin:web` (bitstream/corpus.py) reads this file; nothing at run time needs
SWORD or diatheke.
"""


def module_version(module: str) -> str:
    for conf in Path("/usr/share/sword/mods.d").glob("*.conf"):
        text = conf.read_text(errors="replace")
        if f"[{module}]" in text:
            m = re.search(r"^Version=(.+)$", text, re.M)
            return m.group(1).strip() if m else "unknown"
    return "unknown"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output .txt.gz (ORIGIN.md is written beside it)")
    ap.add_argument("--osis-file", default=None, help="read a saved diatheke OSIS dump instead of running diatheke")
    ap.add_argument("--min-chars", type=int, default=20)
    ap.add_argument("--max-chars", type=int, default=400)
    args = ap.parse_args(argv)

    osis = Path(args.osis_file).read_text(encoding="utf-8") if args.osis_file else run_diatheke()
    lines, stats = build(osis, args.min_chars, args.max_chars)
    if len(lines) < 1000:
        raise SystemExit(f"only {len(lines)} lines extracted; the diatheke output format may have changed")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    raw = write_gzip(out, lines)
    gz = out.read_bytes()
    origin = origin_md(lines, raw, gz, stats, module_version(MODULE), args.min_chars, args.max_chars)
    (out.parent / "ORIGIN.md").write_text(origin, encoding="utf-8")
    print(f"{out}: {len(lines)} lines, {len(raw)} bytes ({len(gz)} gzipped); {stats}", file=sys.stderr)


if __name__ == "__main__":
    main()
