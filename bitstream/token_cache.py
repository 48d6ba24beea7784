"""Stage ``token_cache``: corpus split -> ``uint16`` rows on disk + meta.json (spec §1.1, §1.4).

Two layouts, chosen by the run's ``style``:

* ``lm1b`` (spec §1.1 steps 2-4): every non-empty sentence is tokenised **without** special tokens,
  the sentences are concatenated into one stream with the ``[SEP]`` id *between* consecutive
  non-empty sentences (not before the first), and the stream is cut into consecutive blocks of exactly
  ``seq_len`` tokens; the final partial block is dropped (no padding). Written as
  ``{prefix}.u16`` -- these blocks are the model input.
* ``owt`` (spec §1.4 steps 2-4): every document is normalised (CRLF/CR -> LF, strip), tokenised
  without special tokens, empty documents are skipped, and EOS is appended to each; the flat stream
  is cut into chunks of ``base_seq_len - 2`` tokens, each framed as ``[EOS] + chunk + [EOS]``;
  document boundaries inside a chunk stay as internal EOS. The final partial chunk is dropped.
  Written as the *base* cache ``{prefix}.base.u16``; the codec stage (:mod:`bitstream.codec`) turns
  it into the model input ``{prefix}.u16``.

Both files are raw C-order ``uint16`` ``[n_rows, seq_len]`` (``np.memmap``-able) with a
``.meta.json`` beside them carrying the spec's keys plus ``n_rows``, ``seq_len``, ``dtype`` and the
throughput of the build. :func:`load_cache` refuses a cache whose meta disagrees with what the caller
expects or whose size disagrees with its meta.

Streaming: the split file is read in chunks of lines, tokenised with ``encode_batch`` (optionally in
``workers`` processes, :func:`bitstream.parallel.ordered_map`, results in input order so the cache
is identical for any number of workers), packed incrementally (only the partial block is carried)
and appended to a temporary file that is renamed into place at the end. Memory is bounded by the
chunk size, not the corpus size.

CLI: ``python -m bitstream.token_cache --corpus-dir results/{run}/corpus --tokenizer-dir
results/{run}/tokenizer/base --split S --params '{"style":..., "seq_len":..., "base_seq_len":...,
"bits":...}' --out results/{run}/cache/{S}`` (``--workers N`` or ``"workers"`` in params: processes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from bitstream.io import atomic_path, parse_json_arg, provenance, read_json, sha256_file, stage_main, write_json
from bitstream.parallel import chunked, ordered_map
from bitstream.progress import Progress

DTYPE = np.uint16
UINT16_VOCAB = 65536
LM1B_FORMAT = "packed_token_blocks"
BASE_FORMAT = "framed_base_sequences"
LINES_PER_CHUNK = 2048


# ---------------------------------------------------------------------------------------------------
# Reading a cache


def cache_paths(prefix: str | os.PathLike) -> tuple[Path, Path]:
    """``(prefix.u16, prefix.meta.json)``; ``prefix`` is e.g. ``results/r/cache/train`` or ``.../train.base``."""
    prefix = str(prefix)
    return Path(prefix + ".u16"), Path(prefix + ".meta.json")


def load_cache(prefix: str | os.PathLike, expect: dict | None = None) -> tuple[np.ndarray, dict]:
    """Open a cache read-only: ``(rows [n_rows, seq_len] uint16 memmap, meta)``.

    ``expect`` maps meta keys to required values (e.g. ``{"seq_len": 32, "format": ...}``); any
    disagreement -- or a data file whose size is not ``n_rows * seq_len * 2`` bytes -- raises a
    ``ValueError`` naming the file, the keys, and expected vs found values.
    """
    data_path, meta_path = cache_paths(prefix)
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path}: cache meta not found (build the cache first)")
    if not data_path.exists():
        raise FileNotFoundError(f"{data_path}: cache data not found (its meta exists: a half-copied cache?)")
    meta = read_json(meta_path)
    if expect:
        bad = {k: (v, meta.get(k, "<missing>")) for k, v in expect.items() if meta.get(k, "<missing>") != v}
        if bad:
            detail = "; ".join(f"{k}: expected {v!r}, found {f!r}" for k, (v, f) in bad.items())
            raise ValueError(f"{meta_path}: cache does not match what this job expects ({detail}); "
                             f"rebuild the cache or fix the config")
    try:
        n_rows, seq_len = int(meta["n_rows"]), int(meta["seq_len"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{meta_path}: meta lacks integer n_rows / seq_len ({err})") from err
    want = n_rows * seq_len * np.dtype(DTYPE).itemsize
    have = data_path.stat().st_size
    if have != want:
        raise ValueError(f"{data_path}: {have} bytes, but its meta ({meta_path.name}) says n_rows {n_rows} x "
                         f"seq_len {seq_len} x 2 bytes = {want}; the file is truncated or from another build")
    if n_rows == 0:
        return np.zeros((0, seq_len), dtype=DTYPE), meta
    return np.memmap(data_path, dtype=DTYPE, mode="r", shape=(n_rows, seq_len)), meta


# ---------------------------------------------------------------------------------------------------
# Writing a cache


class RowSink:
    """Appends ``uint16`` rows of a fixed width to an open binary file and counts them."""

    def __init__(self, f, seq_len: int):
        self.f, self.seq_len, self.n_rows = f, int(seq_len), 0

    def write(self, rows: np.ndarray) -> None:
        if rows.size == 0:
            return
        if rows.ndim != 2 or rows.shape[1] != self.seq_len:
            raise ValueError(f"rows of shape {rows.shape}, expected [*, {self.seq_len}]")
        np.ascontiguousarray(rows, dtype=DTYPE).tofile(self.f)
        self.n_rows += rows.shape[0]


@contextlib.contextmanager
def open_rows(prefix: str | os.PathLike, seq_len: int) -> Iterator[RowSink]:
    """Write ``{prefix}.u16`` atomically: rows go to a temporary file renamed into place on success.

    The caller writes the meta with :func:`write_meta` *after* the block, once the data file exists,
    and should compute everything the meta needs inside the block so that a failure leaves nothing.
    """
    data_path, _ = cache_paths(prefix)
    with atomic_path(data_path) as tmp, open(tmp, "wb") as f:
        yield RowSink(f, seq_len)


def write_meta(prefix: str | os.PathLike, meta: dict, sink: RowSink) -> dict:
    """``{prefix}.meta.json`` with the shape keys every cache carries (``n_rows``, ``seq_len``, ``dtype``)."""
    meta = {**meta, "n_rows": sink.n_rows, "seq_len": sink.seq_len, "dtype": "uint16"}
    write_json(cache_paths(prefix)[1], meta)
    return meta


# ---------------------------------------------------------------------------------------------------
# Packing (pure, streaming; unit-tested)


def _flat(id_lists: Iterable[Iterable[int]]) -> tuple[np.ndarray, np.ndarray]:
    lists = [np.asarray(list(x), dtype=np.int64) for x in id_lists]
    lengths = np.array([len(x) for x in lists], dtype=np.int64)
    flat = np.concatenate(lists) if lists else np.zeros(0, dtype=np.int64)
    return flat.astype(np.int64), lengths


class SepPacker:
    """LM1B "sep" packing (spec §1.1 step 3), fed incrementally.

    ``feed(flat_ids, lengths)`` takes a batch of sentences (their ids concatenated, and their
    lengths) and returns the complete ``[n, seq_len]`` blocks that are now available; only the
    partial block is carried over. Empty sentences contribute nothing, not even a [SEP].
    """

    def __init__(self, seq_len: int, sep_id: int):
        self.seq_len, self.sep_id = int(seq_len), int(sep_id)
        self.carry = np.zeros(0, dtype=np.int64)
        self.total_stream_tokens = 0
        self.n_lines = 0
        self.n_nonempty = 0
        self.n_blocks = 0

    def feed(self, flat: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        lengths = np.asarray(lengths, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else lengths
        nonempty = lengths > 0
        sep_at = starts[nonempty]
        if self.n_nonempty == 0 and len(sep_at):
            sep_at = sep_at[1:]  # no [SEP] before the very first sentence of the stream
        piece = np.insert(np.asarray(flat, dtype=np.int64), sep_at, self.sep_id)
        self.n_lines += len(lengths)
        self.n_nonempty += int(nonempty.sum())
        self.total_stream_tokens += len(piece)
        return self._cut(np.concatenate([self.carry, piece]))

    def feed_lists(self, id_lists) -> np.ndarray:
        return self.feed(*_flat(id_lists))

    def _cut(self, stream: np.ndarray) -> np.ndarray:
        n = len(stream) // self.seq_len
        self.carry = stream[n * self.seq_len:]
        self.n_blocks += n
        return stream[: n * self.seq_len].reshape(n, self.seq_len)

    def stats(self) -> dict:
        return {"total_stream_tokens": self.total_stream_tokens, "dropped_tail_tokens": int(len(self.carry)),
                "padded_tail_tokens": 0, "n_nonempty_examples": self.n_nonempty, "n_lines": self.n_lines,
                "n_sequences": self.n_blocks}


class EosFramer:
    """OWT flat stream + framing (spec §1.4 steps 2-4), fed incrementally.

    Each non-empty document contributes its ids followed by EOS; the stream is cut into chunks of
    ``base_seq_len - 2`` ids and each chunk becomes the row ``[EOS] + chunk + [EOS]``.
    """

    def __init__(self, base_seq_len: int, eos_id: int):
        if base_seq_len < 3:
            raise ValueError(f"base_seq_len must be >= 3 for [EOS] + content + [EOS] framing, got {base_seq_len}")
        self.base_seq_len, self.eos_id = int(base_seq_len), int(eos_id)
        self.content_len = self.base_seq_len - 2
        self.carry = np.zeros(0, dtype=np.int64)
        self.n_tokens = 0
        self.n_docs = 0
        self.n_empty = 0
        self.n_rows = 0

    def feed(self, flat: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        lengths = np.asarray(lengths, dtype=np.int64)
        ends = np.cumsum(lengths)
        nonempty = lengths > 0
        piece = np.insert(np.asarray(flat, dtype=np.int64), ends[nonempty], self.eos_id)
        self.n_docs += int(nonempty.sum())
        self.n_empty += int((~nonempty).sum())
        self.n_tokens += len(piece)
        stream = np.concatenate([self.carry, piece])
        n = len(stream) // self.content_len
        self.carry = stream[n * self.content_len:]
        self.n_rows += n
        chunks = stream[: n * self.content_len].reshape(n, self.content_len)
        frame = np.full((n, 1), self.eos_id, dtype=np.int64)
        return np.concatenate([frame, chunks, frame], axis=1)

    def feed_lists(self, id_lists) -> np.ndarray:
        return self.feed(*_flat(id_lists))

    def stats(self) -> dict:
        return {"n_tokens": self.n_tokens, "n_docs": self.n_docs, "n_empty_docs": self.n_empty,
                "dropped_tail_tokens": int(len(self.carry)), "num_sequences": self.n_rows}


# ---------------------------------------------------------------------------------------------------
# Tokenisation workers


_TOKENIZER = None
_NORMALIZE = False


def _init_tokenizer(tokenizer_json: str, normalize: bool) -> None:
    """Worker set-up: the exact backend of the saved tokenizer, from its JSON serialisation."""
    from tokenizers import Tokenizer

    global _TOKENIZER, _NORMALIZE
    _TOKENIZER = Tokenizer.from_str(tokenizer_json)
    # A saved tokenizer may enable fixed padding / truncation (exported sentence-embedding models pad
    # to 128): the caches would fill with [PAD] runs and cut long lines. Corpus encoding never does
    # either, whatever the file says.
    _TOKENIZER.no_padding()
    _TOKENIZER.no_truncation()
    _NORMALIZE = normalize


def _encode_chunk(lines: list[bytes]) -> tuple[np.ndarray, np.ndarray, int]:
    """JSONL lines -> (concatenated ids int64, per-document lengths, number of non-empty texts);
    no special tokens (spec §1.1 step 2, §1.4 step 2)."""
    texts = [json.loads(line)["text"] for line in lines]
    if _NORMALIZE:
        from bitstream.corpus import normalize_owt

        texts = [normalize_owt(t) for t in texts]
    texts = [t.strip() for t in texts]
    encodings = _TOKENIZER.encode_batch_fast(texts, add_special_tokens=False)
    lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
    flat = np.fromiter((i for e in encodings for i in e.ids), dtype=np.int64, count=int(lengths.sum()))
    return flat, lengths, sum(1 for t in texts if t)


SPECIAL_ID_KEYS = tuple(f"{k}_token_id" for k in ("pad", "unk", "cls", "sep", "mask", "bos", "eos"))


def _saved_tokenizer(tokenizer_dir: Path) -> tuple[str, dict]:
    """``(tokenizer.json text, meta)`` of a tokenizer-stage directory.

    The cache needs only the backend pipeline and the ids in meta.json, so it reads them directly
    instead of importing transformers: ``save_pretrained`` wrote the exact backend that
    ``AutoTokenizer.from_pretrained`` uses into tokenizer.json (also for ``kind: pretrained``).
    """
    meta_path, json_path = tokenizer_dir / "meta.json", tokenizer_dir / "tokenizer.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path}: tokenizer not found (run the tokenizer stage first)")
    if not json_path.exists():
        raise FileNotFoundError(f"{json_path}: the token cache needs a fast tokenizer's tokenizer.json")
    meta = read_json(meta_path)
    missing = [k for k in ("vocab_size", "boundary_token_id", "style") if k not in meta]
    if missing:
        raise ValueError(f"{meta_path}: missing {missing} (not written by bitstream.tokenizer?)")
    from tokenizers import Tokenizer

    text = json_path.read_text(encoding="utf-8")
    n = Tokenizer.from_str(text).get_vocab_size(with_added_tokens=True)
    if n != int(meta["vocab_size"]):
        raise ValueError(f"{json_path}: {n} ids, but {meta_path.name} says vocab_size {meta['vocab_size']}")
    return text, meta


def _line_chunks(path: Path, size: int) -> Iterator[list[bytes]]:
    """Non-blank lines of a file in chunks of ``size``, streamed."""
    with open(path, "rb") as f:
        yield from chunked((line for line in f if line.strip()), size)


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))


# ---------------------------------------------------------------------------------------------------
# The stage


def build_cache(corpus_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike, split: str, params: dict,
                out_prefix: str | os.PathLike, workers: int | None = None) -> dict:
    """Tokenise one corpus split and write its cache (layout by ``params["style"]``); returns the meta."""
    style = params.get("style")
    if style not in ("lm1b", "owt"):
        raise ValueError(f"--params: style must be 'lm1b' or 'owt', got {style!r}")
    for key in ("seq_len", "bits") + (("base_seq_len",) if style == "owt" else ()):
        if key not in params:
            raise ValueError(f"--params: missing {key!r} (style {style})")
    workers = int(workers or params.get("workers") or 1)
    corpus_path = Path(corpus_dir) / f"{split}.jsonl"
    if not corpus_path.exists():
        raise FileNotFoundError(f"{corpus_path}: corpus split not found (run the corpus stage first)")
    tokenizer_json, tok_meta = _saved_tokenizer(Path(tokenizer_dir))
    vocab_size = int(tok_meta["vocab_size"])
    if vocab_size > UINT16_VOCAB:
        raise ValueError(f"{tokenizer_dir}: vocabulary of {vocab_size} ids does not fit uint16 caches (<= {UINT16_VOCAB})")
    if tok_meta.get("style") not in (None, style):
        raise ValueError(f"{tokenizer_dir}/meta.json: tokenizer built for style {tok_meta.get('style')!r}, "
                         f"this cache is style {style!r}")
    boundary = int(tok_meta["boundary_token_id"])
    if style == "lm1b":
        from bitstream.bits import check_width

        check_width(vocab_size, int(params["bits"]),
                    where=f"run bits = {params['bits']} vs tokenizer {tok_meta.get('name')} (vocab_size {vocab_size})")
        packer = SepPacker(int(params["seq_len"]), boundary)
        seq_len, prefix = int(params["seq_len"]), str(out_prefix)
    else:
        packer = EosFramer(int(params["base_seq_len"]), boundary)
        seq_len, prefix = int(params["base_seq_len"]), str(out_prefix) + ".base"

    n_lines = _count_lines(corpus_path)
    pad_id = tok_meta.get("pad_token_id")
    n_pad_in_rows = 0
    t0 = time.monotonic()
    n_tokens = n_docs = n_nonempty_text = 0
    chunks = _line_chunks(corpus_path, LINES_PER_CHUNK)
    encoded = ordered_map(_encode_chunk, chunks, workers=workers, initializer=_init_tokenizer,
                          initargs=(tokenizer_json, style == "owt"))
    with open_rows(prefix, seq_len) as sink, \
            Progress(n_lines, f"token_cache {split} ({style})", unit="doc") as progress:
        for flat, lengths, nonempty_text in encoded:
            rows = packer.feed(flat, lengths)
            if pad_id is not None:
                n_pad_in_rows += int(np.count_nonzero(rows == pad_id))
            sink.write(rows)
            n_tokens += int(lengths.sum())
            n_docs += len(lengths)
            n_nonempty_text += nonempty_text
            elapsed = time.monotonic() - t0
            progress.update(len(lengths), tok_s=f"{n_tokens / elapsed:.3g}" if elapsed > 0 else "-")
        seconds = time.monotonic() - t0
        if n_pad_in_rows:
            raise ValueError(f"{corpus_path}: {n_pad_in_rows} pad tokens (id {pad_id}) inside packed rows; "
                             f"expected none -- the text contains the tokenizer's pad token literally")
        if sink.n_rows == 0:
            raise ValueError(f"{corpus_path}: not one complete row of {seq_len} tokens "
                             f"({packer.stats()}); use more text or a shorter sequence length")
        common = {
            "style": style, "split": split, "vocab_size": vocab_size, "tokenizer_name": tok_meta.get("name"),
            "tokenizer_kind": tok_meta.get("kind"), "tokenizer_dir": str(tokenizer_dir), "bits": params["bits"],
            "add_special_tokens": False, "keep_remainder": False, "padding": False, "truncation": False,
            "pad_tokens_in_rows": n_pad_in_rows,  # checked: 0, or the build fails above
            **{k: tok_meta.get(k) for k in SPECIAL_ID_KEYS},
            "corpus_file": str(corpus_path), "corpus_sha256": sha256_file(corpus_path),
            "throughput": {"tokens": n_tokens, "documents": n_docs, "wall_time_s": round(seconds, 3),
                           "tokens_per_s": round(n_tokens / seconds, 1) if seconds > 0 else None,
                           "workers": workers},
            **provenance(params),
        }
        if style == "lm1b":  # spec §1.1 step 4 keys
            meta = {**common, "format": LM1B_FORMAT, "cache_format": LM1B_FORMAT,
                    "packing_strategy": "concat_then_block", "seq_len_tokens": seq_len,
                    "packing_boundary_mode": "sep", "packing_boundary_token_id": boundary,
                    "n_nonempty_lines": n_nonempty_text, **packer.stats()}
        else:                # spec §1.4 step 3 keys; the frame token is bos = eos (GPT-2: 50256)
            meta = {**common, "format": BASE_FORMAT, "base_seq_len_tokens": seq_len,
                    "content_len_tokens": seq_len - 2, "insert_eos": True, "bos_token_id": boundary,
                    "eos_token_id": boundary, "frame_token_id": boundary, **packer.stats()}
    meta = write_meta(prefix, meta, sink)
    rate = n_tokens / seconds if seconds > 0 else float("nan")
    print(f"[token_cache] {split}: {sink.n_rows} rows x {seq_len} -> {cache_paths(prefix)[0]} "
          f"({n_tokens} tokens in {seconds:.2f}s, {rate:.3g} tok/s, {workers} worker(s))", file=sys.stderr)
    return meta


@stage_main("token_cache")
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bitstream.token_cache", description=__doc__.split("\n")[0])
    ap.add_argument("--corpus-dir", required=True, help="results/{run}/corpus")
    ap.add_argument("--tokenizer-dir", required=True, help="results/{run}/tokenizer/base")
    ap.add_argument("--split", required=True, choices=("train", "validation", "test"))
    ap.add_argument("--params", required=True, help='{"style":..., "seq_len":..., "base_seq_len":..., "bits":...}')
    ap.add_argument("--out", required=True, help="results/{run}/cache/{split} (prefix; .u16 / .base.u16 appended)")
    ap.add_argument("--workers", type=int, default=None, help="tokeniser processes (default: params 'workers' or 1)")
    args = ap.parse_args(argv)
    # One worker = one core: without this the Rust tokenizer would also spread over every core.
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    try:
        build_cache(args.corpus_dir, args.tokenizer_dir, args.split, parse_json_arg(args.params), args.out,
                    workers=args.workers)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"token_cache: {err}")


if __name__ == "__main__":
    main()
