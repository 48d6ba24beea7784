"""Stage ``corpus``: source text -> ``{train,validation,test}.jsonl`` (one ``{"text": ...}`` per line).

Sources (``corpus.source``):

* ``builtin:web`` -- the corpus shipped in ``bitstream/corpora/web.txt.gz`` (World English Bible
  derived, public domain; see ``corpora/ORIGIN.md``), one verse per line.
* ``text:<file>[,<file>...]`` -- local UTF-8 text files (``.gz`` allowed), one line = one
  sentence/document.
* ``hf:lm1b`` / ``hf:openwebtext`` -- Hugging Face ``datasets``, streamed. ``corpus.hf_path`` (a local
  directory, a ``save_to_disk`` directory or data files) stands in for the hub name and goes through
  the same code path (:func:`open_hf_split`). Note: the canonical hub repositories of both datasets
  are loading-script datasets, which recent ``datasets`` releases no longer run; point
  ``corpus.hf_path`` at a Parquet/JSON copy (hub mirror id or local directory) in that case.

Splits:

* LM1B (spec §1.1 step 1): every sentence goes through :func:`detokenize_lm1b`, empties are dropped;
  ``train`` = hub ``train`` minus its last ``round(0.005 N)`` sentences (at least 1), which form
  ``validation``; ``test`` = hub ``test``. Upstream holds out the last 0.5% of the *packed rows* of
  the train cache; we hold out the last 0.5% of *sentences* (same position, same share, but the
  split is a text file every later stage can use -- judge, tokenizer and cache alike).
* OpenWebText (spec §1.4 step 1): each document is normalised (CRLF/CR -> LF, strip); ``train`` = all
  documents but the last ``validation_documents`` (default 100,000) of hub ``train``, ``validation`` =
  those, ``test`` = ``validation`` (upstream evaluates on the validation split). The cut is made on the
  raw document positions, as ``train[:-100000]`` does, and empty documents are then dropped.
* builtin / text: ``lines_per_document`` consecutive non-empty lines form one document (joined by a
  space: OWT-style runs of prose), ``max_documents`` keeps the first N documents, and document ``i``
  goes to ``validation`` / ``test`` / ``train`` by the position of ``frac(i * phi)`` (golden-ratio
  sequence) in ``[0, v) / [v, v + t) / rest``. This is deterministic, splits whole documents, needs
  no shuffling buffer, and spreads held-out documents evenly over the corpus (the shipped corpus is
  in book order; a tail split would hold out only Revelation).

``max_documents`` also caps each HF split that is read. Everything streams: memory stays bounded for a
corpus of any size. ``meta.json`` records counts, characters, sha256 of every output and of the
source, the parameters, throughput and provenance.

CLI: ``python -m bitstream.corpus --params '{"style":..., "corpus":{...}}' --out-dir results/{run}/corpus``
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import re
import shutil
import sys
import time
from collections import deque
from pathlib import Path
from typing import Iterable, Iterator

from bitstream.io import UserError, os_error_message, parse_json_arg, provenance, sha256_file, stage_main, write_json
from bitstream.parallel import chunked
from bitstream.progress import Progress

SPLITS = ("train", "validation", "test")
CORPORA_DIR = Path(__file__).resolve().parent / "corpora"
BUILTIN = {"web": CORPORA_DIR / "web.txt.gz"}
HF_HUB_NAMES = {"lm1b": "lm1b", "openwebtext": "openwebtext"}
LM1B_VALIDATION_SHARE = 0.005        # spec §1.1 step 5
OWT_VALIDATION_DOCUMENTS = 100_000   # spec §1.4 step 1
_PHI = (math.sqrt(5.0) - 1.0) / 2.0  # golden-ratio step of the low-discrepancy split sequence

# Mirrors workflow/schemas/config.schema.yaml (library callers may pass a partial section).
CORPUS_DEFAULTS = {"hf_path": None, "max_documents": None, "lines_per_document": 1,
                   "validation_fraction": 0.02, "test_fraction": 0.02, "validation_documents": None,
                   "workers": 1}


# ---------------------------------------------------------------------------------------------------
# Text normalisation


_URL = re.compile(r"\b(https?|ftp) : / / ")
_CLITIC = re.compile(r" '(s|re|ve|ll|d|m|t)\b", re.IGNORECASE)  # "it 's", "don 't", "we 've"
_PTB_NEGATION = re.compile(r"(\w) n't\b")                          # "do n't" (PTB style)
_SPACE_BEFORE_PUNCT = re.compile(r" +([.,?!:;])")
_DOUBLE_QUOTED = re.compile(r'" ([^"]*?) "')
_SINGLE_QUOTED = re.compile(r"(^| )' ([^']*?) '(?= |$)")
_PARENS = re.compile(r"\( ([^()]*?) \)")
_BRACKETS = re.compile(r"\[ ([^\[\]]*?) \]")
_CURRENCY = re.compile(r"([$\u00a3]) +")
_SPACES = re.compile(r"\s+")


def detokenize_lm1b(text: str) -> str:
    """Undo LM1B's Moses-style tokenisation, the SEDD/MDLM way (spec §1.1 step 1).

    Glue ``http : / /``; re-attach ``'s``-style clitics; no space before ``. , ? ! : ;``; no space
    just inside paired quotes, parentheses and brackets; ``$ 5`` -> ``$5`` (also ``£``).
    """
    x = _URL.sub(r"\1://", text)
    x = _CLITIC.sub(r"'\1", x)
    x = _PTB_NEGATION.sub(r"\1n't", x)
    x = _SPACE_BEFORE_PUNCT.sub(r"\1", x)
    x = _DOUBLE_QUOTED.sub(r'"\1"', x)
    x = _SINGLE_QUOTED.sub(r"\1'\2'", x)
    x = _PARENS.sub(r"(\1)", x)
    x = _BRACKETS.sub(r"[\1]", x)
    x = _CURRENCY.sub(r"\1", x)
    return _SPACES.sub(" ", x).strip()


def normalize_owt(text: str) -> str:
    """OpenWebText document normalisation (spec §1.4 step 2): CRLF / CR -> LF, strip."""
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def _detokenize_chunk(texts: list[str]) -> list[str]:
    return [detokenize_lm1b(t) for t in texts]


def _normalize_chunk(texts: list[str]) -> list[str]:
    return [normalize_owt(t) for t in texts]


# ---------------------------------------------------------------------------------------------------
# Readers


def read_lines(paths: Iterable[str | os.PathLike]) -> Iterator[str]:
    """Stripped non-empty lines of UTF-8 text files (``.gz`` decompressed), in order."""
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: corpus text file not found")
        opener = gzip.open if path.suffix == ".gz" else open
        try:
            with opener(path, "rt", encoding="utf-8", errors="strict") as f:
                for line in f:
                    line = line.strip()
                    if line:
                        yield line
        except UnicodeDecodeError as err:
            bad = err.object[err.start:err.start + 1].hex()
            raise ValueError(f"{path}: not UTF-8 text ({err.reason}: byte 0x{bad}); "
                             f"expected UTF-8 -- convert it, e.g. iconv -f latin1 -t utf-8") from err
        except (EOFError, gzip.BadGzipFile) as err:
            raise ValueError(f"{path}: not a readable gzip file ({err})") from err


def group_documents(lines: Iterable[str], lines_per_document: int) -> Iterator[str]:
    """Consecutive runs of ``lines_per_document`` lines joined by a space (the last run may be short)."""
    run: list[str] = []
    for line in lines:
        run.append(line)
        if len(run) == lines_per_document:
            yield " ".join(run)
            run = []
    if run:
        yield " ".join(run)


def split_of(index: int, validation_fraction: float, test_fraction: float) -> str:
    """The split of document ``index`` (golden-ratio sequence; see the module docstring)."""
    u = (index * _PHI) % 1.0
    if u < validation_fraction:
        return "validation"
    if u < validation_fraction + test_fraction:
        return "test"
    return "train"


def _looks_saved_to_disk(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists())


def open_hf_split(name: str, hf_path: str | None, split: str, text_column: str = "text") -> Iterator[str]:
    """Stream the ``text_column`` of one split of a Hugging Face dataset.

    ``hf_path`` (optional) replaces the hub ``name``: a directory written by ``save_to_disk`` is read
    with ``load_from_disk`` (memory-mapped Arrow, so bounded memory); anything else -- a hub id, a
    directory of data files, a single data file -- goes through ``load_dataset(..., streaming=True)``.
    """
    import datasets

    source = hf_path or name
    path = Path(source)
    try:
        if _looks_saved_to_disk(path):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(f"{source}: no split {split!r} (has {', '.join(ds)})")
                ds = ds[split]
            elif split != "train":
                raise ValueError(f"{source}: a single saved dataset has no split {split!r}")
        elif path.is_file():
            builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv",
                       ".txt": "text", ".arrow": "arrow"}.get(path.suffix)
            if builder is None:
                raise ValueError(f"{source}: unknown data file type {path.suffix!r}")
            ds = datasets.load_dataset(builder, data_files={"train": str(path)}, split=split, streaming=True)
        else:
            ds = datasets.load_dataset(source, split=split, streaming=True)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as err:  # noqa: BLE001 -- datasets raises many types; name the source and split
        raise ValueError(f"corpus: could not open split {split!r} of {source!r} "
                         f"({type(err).__name__}: {err})") from err
    features = getattr(ds, "column_names", None) or list(getattr(ds, "features", None) or [])
    if features and text_column not in features:
        raise ValueError(f"{source} [{split}]: no column {text_column!r} (columns: {', '.join(features)})")
    for row in ds:
        try:
            yield row[text_column]
        except KeyError:  # streamed hub datasets may not announce their columns up front
            raise ValueError(f"{source} [{split}]: no column {text_column!r} (columns: {', '.join(row)})") from None


def _take(items: Iterable, n: int | None) -> Iterator:
    for i, item in enumerate(items):
        if n is not None and i >= n:
            return
        yield item


# ---------------------------------------------------------------------------------------------------
# Writers


def _jsonl(text: str) -> bytes:
    return (json.dumps({"text": text}, ensure_ascii=False) + "\n").encode("utf-8")


class _SplitFiles:
    """Three temporary JSONL files, renamed into place together by :meth:`commit`."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        self.tmp = {s: out_dir / f".{s}.jsonl.tmp" for s in SPLITS}
        self.files = {s: open(p, "wb") for s, p in self.tmp.items()}
        self.docs = {s: 0 for s in SPLITS}
        self.chars = {s: 0 for s in SPLITS}

    def write(self, split: str, text: str) -> int:
        """Append one document; returns its byte offset in the split file."""
        f = self.files[split]
        offset = f.tell()
        f.write(_jsonl(text))
        self.docs[split] += 1
        self.chars[split] += len(text)
        return offset

    def move_tail(self, src: str, dst: str, offset: int, n_docs: int, n_chars: int) -> None:
        """Move everything from byte ``offset`` of split ``src`` to the end of split ``dst``."""
        f = self.files[src]
        f.flush()
        with open(self.tmp[src], "rb") as r:
            r.seek(offset)
            shutil.copyfileobj(r, self.files[dst], 1 << 20)
        f.seek(offset)
        f.truncate()
        self.docs[src] -= n_docs
        self.docs[dst] += n_docs
        self.chars[src] -= n_chars
        self.chars[dst] += n_chars

    def copy(self, src: str, dst: str) -> None:
        self.files[src].flush()
        with open(self.tmp[src], "rb") as r:
            shutil.copyfileobj(r, self.files[dst], 1 << 20)
        self.docs[dst] += self.docs[src]
        self.chars[dst] += self.chars[src]

    def commit(self) -> dict:
        """Close, check no split is empty, rename; returns {split: sha256}."""
        for f in self.files.values():
            f.close()
        empty = [s for s in SPLITS if self.docs[s] == 0]
        if empty:
            raise ValueError(f"corpus: split(s) {', '.join(empty)} came out empty "
                             f"(documents per split: {self.docs}); use more documents "
                             f"(corpus.max_documents) or larger split fractions")
        sha = {s: sha256_file(self.tmp[s]) for s in SPLITS}
        for s in SPLITS:
            os.replace(self.tmp[s], self.out_dir / f"{s}.jsonl")
        return sha

    def abort(self) -> None:
        for f in self.files.values():
            try:
                f.close()
            except OSError:  # flushing the buffer fails again on a full disk; the file goes anyway
                pass
        for p in self.tmp.values():
            p.unlink(missing_ok=True)


class _TailTracker:
    """Byte offsets of the last documents written to a split, to hold out a tail after one pass.

    ``keep(n)`` says how many of the most recent entries may still be needed when ``n`` documents
    have been written; it must never decrease by more than the one entry each write adds.
    """

    def __init__(self, keep):
        self.keep = keep
        self.entries: deque = deque()   # (key, offset, n_chars)
        self.n = 0

    def add(self, key: int, offset: int, n_chars: int) -> None:
        self.entries.append((key, offset, n_chars))
        self.n += 1
        limit = self.keep(self.n)
        while len(self.entries) > limit:
            self.entries.popleft()


# ---------------------------------------------------------------------------------------------------
# Builders


def _source_files(source: str) -> list[Path]:
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name not in BUILTIN:
            raise ValueError(f"corpus.source: unknown builtin corpus {name!r} (have: {', '.join(BUILTIN)})")
        path = BUILTIN[name]
        if not path.exists():
            raise FileNotFoundError(f"{path}: the builtin corpus is missing from the package "
                                    f"(rebuild with scripts/build_web_corpus.py)")
        return [path]
    files = [Path(p.strip()) for p in source.split(":", 1)[1].split(",") if p.strip()]
    if not files:
        raise ValueError(f"corpus.source: {source!r} names no files (expected text:<file>[,<file>...])")
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"{f}: corpus text file not found (corpus.source = {source!r})")
    return files


def _build_lines(cfg: dict, out: _SplitFiles, progress: Progress) -> dict:
    files = _source_files(cfg["source"])
    v, t = float(cfg["validation_fraction"]), float(cfg["test_fraction"])
    if v + t >= 1.0:
        raise ValueError(f"corpus: validation_fraction + test_fraction = {v + t} leaves nothing to train on")
    docs = _take(group_documents(read_lines(files), int(cfg["lines_per_document"])), cfg["max_documents"])
    for i, doc in enumerate(docs):
        out.write(split_of(i, v, t), doc)
        progress.update(1)
    return {"files": [{"path": str(f), "sha256": sha256_file(f), "bytes": f.stat().st_size} for f in files]}


def _map_chunks(fn, texts: Iterable[str], workers: int) -> Iterator[str]:
    from bitstream.parallel import ordered_map

    for chunk in ordered_map(fn, chunked(texts, 4096), workers=workers):
        yield from chunk


def _build_lm1b(cfg: dict, out: _SplitFiles, progress: Progress) -> dict:
    name, hf_path, workers = HF_HUB_NAMES["lm1b"], cfg["hf_path"], int(cfg["workers"])
    stats = {"hf_name": name, "hf_path": hf_path, "dropped_empty": {"train": 0, "test": 0}}
    keep = lambda n: max(1, round(LM1B_VALIDATION_SHARE * n))  # noqa: E731
    tail = _TailTracker(keep)
    for split in ("train", "test"):
        raw = _take(open_hf_split(name, hf_path, split), cfg["max_documents"])
        for text in _map_chunks(_detokenize_chunk, raw, workers):
            progress.update(1)
            if not text:
                stats["dropped_empty"][split] += 1
                continue
            offset = out.write(split, text)
            if split == "train":
                tail.add(tail.n, offset, len(text))
    if tail.n < 2:
        raise ValueError(f"corpus: LM1B train split of {hf_path or name!r} has {tail.n} non-empty "
                         f"sentence(s); need at least 2 to hold out a validation sentence")
    k = keep(tail.n)
    held = list(tail.entries)[-k:]
    out.move_tail("train", "validation", held[0][1], k, sum(e[2] for e in held))
    stats["validation_rule"] = f"last round({LM1B_VALIDATION_SHARE} * {tail.n}) = {k} train sentences"
    return stats


def _build_owt(cfg: dict, out: _SplitFiles, progress: Progress) -> dict:
    name, hf_path, workers = HF_HUB_NAMES["openwebtext"], cfg["hf_path"], int(cfg["workers"])
    k = int(cfg["validation_documents"] or OWT_VALIDATION_DOCUMENTS)
    tail = _TailTracker(lambda n: k + 1)
    n_raw, empty = 0, 0
    raw = _take(open_hf_split(name, hf_path, "train"), cfg["max_documents"])
    for text in _map_chunks(_normalize_chunk, raw, workers):
        progress.update(1)
        if text:
            tail.add(n_raw, out.write("train", text), len(text))
        else:
            empty += 1
        n_raw += 1
    if k >= n_raw:
        raise ValueError(f"corpus.validation_documents = {k} leaves no training documents: "
                         f"{hf_path or name!r} [train] has {n_raw} documents")
    held = [e for e in tail.entries if e[0] >= n_raw - k]
    if held:
        out.move_tail("train", "validation", held[0][1], len(held), sum(e[2] for e in held))
    out.copy("validation", "test")  # spec §1.4: OWT evaluates on the validation split
    return {"hf_name": name, "hf_path": hf_path, "raw_documents": n_raw, "dropped_empty": empty,
            "validation_rule": f"last {k} of {n_raw} raw train documents; test = validation"}


def build_corpus(params: dict, out_dir: str | os.PathLike) -> dict:
    """Write the three split files and ``meta.json`` into ``out_dir``; returns the meta."""
    if "corpus" not in params:
        raise ValueError("--params: missing the 'corpus' section")
    cfg = {**CORPUS_DEFAULTS, **params["corpus"]}
    source = cfg.get("source")
    if not isinstance(source, str) or not re.fullmatch(r"builtin:\w+|text:.+|hf:(lm1b|openwebtext)", source):
        raise ValueError(f"corpus.source: expected builtin:web | text:<file>[,...] | hf:lm1b | "
                         f"hf:openwebtext, got {source!r}")
    if cfg["hf_path"] and not source.startswith("hf:"):
        raise ValueError(f"corpus.hf_path is only used with hf: sources (source = {source!r})")
    out_dir = Path(out_dir)
    out = _SplitFiles(out_dir)
    t0 = time.monotonic()
    try:
        with Progress(None, f"corpus {source}", unit="doc") as progress:
            if source == "hf:lm1b":
                details = _build_lm1b(cfg, out, progress)
            elif source == "hf:openwebtext":
                details = _build_owt(cfg, out, progress)
            else:
                details = _build_lines(cfg, out, progress)
            n_read = progress.n
        sha = out.commit()
    except OSError as err:
        out.abort()
        if err.errno is not None and err.filename is None:  # a failed write to the split files (no space, quota): name the directory
            raise UserError(os_error_message(err, out_dir, "cannot write")) from err
        raise
    except BaseException:
        out.abort()
        raise
    seconds = time.monotonic() - t0
    meta = {
        "source": source,
        "style": params.get("style"),
        "params": cfg,
        "splits": {s: {"documents": out.docs[s], "chars": out.chars[s], "sha256": sha[s]} for s in SPLITS},
        "source_details": details,
        "documents_read": n_read,
        "wall_time_s": round(seconds, 3),
        "documents_per_s": round(n_read / seconds, 1) if seconds > 0 else None,
        **provenance(params),
    }
    write_json(out_dir / "meta.json", meta)
    counts = ", ".join(f"{s} {out.docs[s]}" for s in SPLITS)
    print(f"[corpus] {source}: {counts} documents; {n_read} read in {seconds:.1f}s", file=sys.stderr)
    return meta


def read_split(corpus_dir: str | os.PathLike, split: str) -> Iterator[str]:
    """The texts of ``{corpus_dir}/{split}.jsonl``, streamed."""
    path = Path(corpus_dir) / f"{split}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: corpus split not found (run the corpus stage first)")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                yield json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{lineno}: expected a JSON object with a 'text' field ({err})")


@stage_main("corpus")
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bitstream.corpus", description=__doc__.split("\n")[0])
    ap.add_argument("--params", required=True, help='{"style": ..., "corpus": {...}} (JSON or @file)')
    ap.add_argument("--out-dir", required=True, help="results/{run}/corpus")
    args = ap.parse_args(argv)
    try:
        build_corpus(parse_json_arg(args.params), args.out_dir)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"corpus: {err}")


if __name__ == "__main__":
    main()
