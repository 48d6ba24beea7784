"""Stage ``codec``: the second-stage "code" tokenizer of OWT-style runs (spec §1.5).

Base sequences (framed base-token rows, spec §1.4) are re-compressed by a byte-pair encoding over
*base ids*: id ``t`` becomes the private-use character ``chr(0xF0000 + t)``, a row becomes a string,
and a bare BPE (no normaliser, no pre-tokeniser -- merges may cross any boundary, EOS included) with
special tokens ``[PAD]`` = 0, ``[UNK]`` = 1, ``[EOSEQ]`` = 2 and every base id in its initial alphabet
is trained on the train rows. Its ids ("codes") are the model input of OWT-style runs, ``bits`` wide.

``codec train``  -- train (or, with ``code_tokenizer.path``, copy a given tokenizer JSON), scan the
encoded lengths of the training rows and write ``tokenizer.json`` + ``meta.json`` (spec §1.5 keys,
including ``encoding_length_stats`` and ``recommended_code_seq_len_tokens`` = max length + 1). A log
warning is printed when the run's ``seq_len`` would truncate more than 1% of the rows.
``codec encode`` -- every base row -> codes + ``[EOSEQ]``; longer than ``seq_len``: cut to
``seq_len`` with the last id forced to ``[EOSEQ]``; shorter: right-padded with ``[PAD]``
(spec §1.5 "Building the code cache"). PAD positions are not masked: the model generates them.

The inverse (:func:`inverse_codec`, spec §1.5 "Inverse codec") stops at the first PAD or EOSEQ,
maps each kept code to its *vocabulary string* and joins them with no separator (upstream calls
``decode``, which inserts spaces that only vanish because they are not PUA characters -- spec
§14.13; we never rely on that), turns PUA characters back into base ids (anything else, e.g. the
text of ``[UNK]``, is skipped), and strips exactly one framing EOS at each end while keeping
internal EOS.

CLI::

    python -m bitstream.codec train --base-cache results/{run}/cache/train.base \\
        --params '{"code_tokenizer":{...}, "bits":..., "seq_len":...}' --out-dir results/{run}/tokenizer/code
    python -m bitstream.codec encode --base-cache results/{run}/cache/{S}.base \\
        --code-dir results/{run}/tokenizer/code --params '{"seq_len":..., "bits":...}' --out results/{run}/cache/{S}
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from bitstream.io import atomic_path, parse_json_arg, provenance, read_json, sha256_file, stage_main, write_json
from bitstream.parallel import ordered_map
from bitstream.progress import Progress
from bitstream.token_cache import BASE_FORMAT, UINT16_VOCAB, cache_paths, load_cache, open_rows, write_meta

BASE_CHAR_OFFSET = 0xF0000          # 983040: plane-15 private use area
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[EOSEQ]"]
PAD_ID, UNK_ID, EOSEQ_ID = 0, 1, 2
CODE_FORMAT = "pua_bpe_code_tokenizer"
CODE_CACHE_FORMAT = "code_token_rows"
CODE_DEFAULTS = {"vocab_size": 65536, "path": None, "limit_sequences": None, "min_frequency": 2}
ROWS_PER_CHUNK = 2048
TRUNCATION_WARN = 0.01


# ---------------------------------------------------------------------------------------------------
# Base ids <-> private-use strings


def ids_to_pua(ids) -> str:
    """Base ids -> one string of ``chr(0xF0000 + id)`` (vectorised through UTF-32)."""
    return (np.asarray(ids, dtype=np.uint32) + BASE_CHAR_OFFSET).astype("<u4").tobytes().decode("utf-32-le")


def pua_to_ids(text: str, base_vocab_size: int) -> np.ndarray:
    """PUA string -> base ids; characters outside ``[0xF0000, 0xF0000 + V)`` are skipped (spec §1.5 inverse 4)."""
    codepoints = np.frombuffer(text.encode("utf-32-le"), dtype="<u4").astype(np.int64) - BASE_CHAR_OFFSET
    return codepoints[(codepoints >= 0) & (codepoints < base_vocab_size)]


# ---------------------------------------------------------------------------------------------------
# Training


def train_code_tokenizer(rows: np.ndarray, base_vocab_size: int, vocab_size: int, min_frequency: int = 2):
    """Bare BPE over PUA strings of ``rows`` (spec §1.5 "Training the codec" steps 1-2)."""
    from tokenizers import Tokenizer, models, trainers

    if vocab_size < base_vocab_size + len(SPECIAL_TOKENS):
        raise ValueError(f"code_tokenizer.vocab_size = {vocab_size} is smaller than the base vocabulary "
                         f"({base_vocab_size}) + {len(SPECIAL_TOKENS)} special tokens: every base id must "
                         f"stay encodable")
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))  # no normalizer, no pre-tokenizer: on purpose
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=[chr(BASE_CHAR_OFFSET + i) for i in range(base_vocab_size)], show_progress=False)
    strings = (ids_to_pua(row) for row in rows)
    tok.train_from_iterator(strings, trainer, length=len(rows))
    return tok


def check_code_tokenizer(tok, base_vocab_size: int, where: str) -> None:
    """The special ids must be 0/1/2 and every base id must be a single-character token."""
    got = {s: tok.token_to_id(s) for s in SPECIAL_TOKENS}
    want = dict(zip(SPECIAL_TOKENS, (PAD_ID, UNK_ID, EOSEQ_ID)))
    if got != want:
        raise ValueError(f"{where}: special token ids {got}, expected {want}")
    missing = [i for i in range(base_vocab_size) if tok.token_to_id(chr(BASE_CHAR_OFFSET + i)) is None]
    if missing:
        raise ValueError(f"{where}: {len(missing)} base ids have no code token (e.g. {missing[:5]}); the code "
                         f"tokenizer was built for another base vocabulary than this run's {base_vocab_size}")


def official_meta_path(path: str) -> str:
    """``X.json`` -> ``X.meta.json``: the meta file the official builder writes beside its tokenizer."""
    return (path[:-len(".json")] if path.endswith(".json") else path) + ".meta.json"


def given_code_tokenizer(path: str, base_vocab_size: int, eos_id: int, base_seq_len: int | None = None):
    """``code_tokenizer.path``: a tokenizer JSON (local or ``hub:``), e.g. the official OWT code tokenizer.

    The official ``tokenizer_gpt2id_bpe16_*.json`` is a bare BPE over ``chr(0xF0000 + base id)`` with
    ``[PAD]``/``[UNK]``/``[EOSEQ]`` = 0/1/2 -- and, unlike ours, ``"\n"`` at id 3 (its builder trains
    from a newline-separated file), so every id is read from its vocabulary, never from an offset.
    Its ``.meta.json`` (beside it, or fetched beside the hub file) is checked against this run: base
    character offset, base vocabulary, EOS and special ids, and (when given) the framed base length it was
    built for -- its merges were learnt on rows of that length. Returns ``(tokenizer, origin record)``.
    """
    from tokenizers import Tokenizer

    from bitstream.hub import is_hub, resolve_file

    src, prov = resolve_file(path, "code tokenizer (code_tokenizer.path)")
    try:
        tok = Tokenizer.from_file(str(src))
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"code_tokenizer.path = {path}: not a tokenizers JSON file ({err})") from err
    check_code_tokenizer(tok, base_vocab_size, where=str(path))
    origin = {"copied_from": str(path), "resolved_path": str(src), "sha256": sha256_file(src),
              "revision": prov.get("revision"), "commit": prov.get("commit")}
    meta_value = official_meta_path(str(path))
    if is_hub(meta_value) or Path(meta_value).is_file():
        meta_path, _ = resolve_file(meta_value, "code tokenizer meta (.meta.json beside code_tokenizer.path)")
        official = read_json(meta_path)
        checks = {"base_char_offset": (official.get("base_char_offset"), BASE_CHAR_OFFSET),
                  "vocab_size_gpt2": (official.get("vocab_size_gpt2", base_vocab_size), base_vocab_size),
                  "eos_token_id_gpt2": (official.get("eos_token_id_gpt2", eos_id), eos_id),
                  "pad_id": (official.get("pad_id", PAD_ID), PAD_ID), "unk_id": (official.get("unk_id", UNK_ID), UNK_ID),
                  "eoseq_id": (official.get("eoseq_id", EOSEQ_ID), EOSEQ_ID)}
        if base_seq_len is not None and "base_seq_len_tokens" in official:
            checks["base_seq_len_tokens"] = (official["base_seq_len_tokens"], int(base_seq_len))
        bad = [f"{k} = {got!r} (this run needs {want!r})" for k, (got, want) in checks.items() if got != want]
        if bad:
            raise ValueError(f"{meta_value}: code tokenizer meta does not fit this run: {'; '.join(bad)}")
        origin["official_meta"] = official
    return tok, origin


def encoding_length_stats(lengths: np.ndarray) -> dict:
    lengths = np.asarray(lengths)
    q = np.percentile(lengths, [50, 90, 95, 99, 99.9])
    return {"n": int(len(lengths)), "min": int(lengths.min()), "mean": float(lengths.mean()),
            "max": int(lengths.max()), "p50": float(q[0]), "p90": float(q[1]), "p95": float(q[2]),
            "p99": float(q[3]), "p99_9": float(q[4])}


def _lengths(tok, rows: np.ndarray) -> np.ndarray:
    out = []
    for start in range(0, len(rows), ROWS_PER_CHUNK):
        enc = tok.encode_batch_fast([ids_to_pua(r) for r in rows[start:start + ROWS_PER_CHUNK]],
                                    add_special_tokens=False)
        out.extend(len(e.ids) for e in enc)
    return np.asarray(out, dtype=np.int64)


def build_code_tokenizer(base_prefix: str | os.PathLike, params: dict, out_dir: str | os.PathLike) -> dict:
    """``codec train``: write ``tokenizer.json`` + ``meta.json`` into ``out_dir``; returns the meta."""
    from bitstream.bits import check_width
    from tokenizers import Tokenizer

    cfg = {**CODE_DEFAULTS, **(params.get("code_tokenizer") or {})}
    for key in ("bits", "seq_len"):
        if key not in params:
            raise ValueError(f"--params: missing {key!r}")
    bits, seq_len = int(params["bits"]), int(params["seq_len"])
    rows, base_meta = load_cache(base_prefix, expect={"format": BASE_FORMAT})
    base_vocab, eos = int(base_meta["vocab_size"]), int(base_meta["eos_token_id"])
    if cfg["limit_sequences"]:
        rows = rows[: int(cfg["limit_sequences"])]

    t0 = time.monotonic()
    if cfg["path"]:
        tok, origin = given_code_tokenizer(cfg["path"], base_vocab, eos, int(base_meta["seq_len"]))
    else:
        print(f"[codec] training BPE to {cfg['vocab_size']} codes on {len(rows)} base rows "
              f"(base vocabulary {base_vocab})", file=sys.stderr, flush=True)
        tok = train_code_tokenizer(rows, base_vocab, int(cfg["vocab_size"]), int(cfg["min_frequency"]))
        origin = {"trained_on": str(base_prefix), "rows": int(len(rows))}
    train_seconds = time.monotonic() - t0
    code_vocab = tok.get_vocab_size()
    if code_vocab > UINT16_VOCAB:
        raise ValueError(f"code tokenizer has {code_vocab} codes; the uint16 cache holds at most {UINT16_VOCAB}")
    check_width(code_vocab, bits, where=f"run bits = {bits} vs code tokenizer (vocab_size {code_vocab})")
    if not cfg["path"] and code_vocab < int(cfg["vocab_size"]):
        print(f"[codec] warning: BPE stopped at {code_vocab} codes, below the target "
              f"code_tokenizer.vocab_size = {cfg['vocab_size']} (no pair occurs >= min_frequency = "
              f"{cfg['min_frequency']} times any more); {2 ** bits - code_vocab} of the {2 ** bits} "
              f"{bits}-bit codes are invalid", file=sys.stderr)

    lengths = _lengths(tok, rows)
    stats = encoding_length_stats(lengths)
    truncated = float(np.mean(lengths + 1 > seq_len))
    print(f"[codec] code lengths (without EOSEQ): min {stats['min']}, mean {stats['mean']:.1f}, "
          f"p99 {stats['p99']:.0f}, max {stats['max']}; seq_len {seq_len} truncates {truncated:.2%} of "
          f"the training rows; recommended seq_len {stats['max'] + 1}", file=sys.stderr)
    if truncated > TRUNCATION_WARN:
        print(f"[codec] WARNING: seq_len = {seq_len} truncates {truncated:.1%} of the rows (> "
              f"{TRUNCATION_WARN:.0%}); truncated rows lose their tail on decoding. Raise seq_len to "
              f"~{int(np.ceil(stats['p99'])) + 1} (p99 + 1) or {stats['max'] + 1} (max + 1)", file=sys.stderr)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "tokenizer.json") as tmp:
        tok.save(str(tmp))
    meta = {
        "format": CODE_FORMAT,
        "base_vocab_size": base_vocab, "bos_token_id_base": int(base_meta["bos_token_id"]),
        "eos_token_id_base": eos, "base_tokenizer_name": base_meta.get("tokenizer_name"),
        "base_seq_len_tokens": int(base_meta["seq_len"]), "content_len_tokens": int(base_meta["seq_len"]) - 2,
        "base_char_offset": BASE_CHAR_OFFSET,
        "target_code_vocab_size": int(cfg["vocab_size"]), "actual_code_vocab_size": code_vocab,
        "vocab_size": code_vocab, "min_frequency": int(cfg["min_frequency"]),
        "special_tokens": SPECIAL_TOKENS, "pad_id": PAD_ID, "unk_id": UNK_ID, "eoseq_id": EOSEQ_ID,
        "encoding_length_stats": stats, "recommended_code_seq_len_tokens": stats["max"] + 1,
        "seq_len": seq_len, "truncated_fraction_at_seq_len": truncated,
        "bits_per_code_token": bits, "invalid_codes": 2 ** bits - code_vocab,
        "tokenizer_sha256": sha256_file(out_dir / "tokenizer.json"), "origin": origin,
        "train_seconds": round(train_seconds, 3), "params": cfg, **provenance(params),
    }
    write_json(out_dir / "meta.json", meta)
    print(f"[codec] {code_vocab} codes -> {out_dir} ({train_seconds:.1f}s)", file=sys.stderr)
    return meta


# ---------------------------------------------------------------------------------------------------
# Encoding


def frame_codes(codes: Sequence[int], seq_len: int) -> tuple[np.ndarray, bool]:
    """codes + [EOSEQ], cut to ``seq_len`` with the last id forced to EOSEQ, or right-padded with PAD."""
    row = np.full(seq_len, PAD_ID, dtype=np.int64)
    k = min(len(codes), seq_len - 1)
    row[:k] = codes[:k]
    row[k] = EOSEQ_ID
    return row, len(codes) + 1 > seq_len


_CODE_TOKENIZER = None


def _init_code_tokenizer(tokenizer_json: str) -> None:
    from tokenizers import Tokenizer

    global _CODE_TOKENIZER
    _CODE_TOKENIZER = Tokenizer.from_str(tokenizer_json)


def _encode_rows(args: tuple[np.ndarray, int]) -> tuple[np.ndarray, np.ndarray]:
    """Base rows -> (framed code rows [n, seq_len], code lengths without EOSEQ)."""
    rows, seq_len = args
    enc = _CODE_TOKENIZER.encode_batch_fast([ids_to_pua(r) for r in rows], add_special_tokens=False)
    out = np.empty((len(enc), seq_len), dtype=np.int64)
    lengths = np.empty(len(enc), dtype=np.int64)
    for i, e in enumerate(enc):
        out[i], _ = frame_codes(e.ids, seq_len)
        lengths[i] = len(e.ids)
    return out, lengths


def load_code_tokenizer(code_dir: str | os.PathLike):
    """``(tokenizers.Tokenizer, meta)`` of a ``codec train`` output directory."""
    from tokenizers import Tokenizer

    code_dir = Path(code_dir)
    path = code_dir / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: code tokenizer not found (run `codec train` first)")
    meta = read_json(code_dir / "meta.json")
    return Tokenizer.from_file(str(path)), meta


def encode_cache(base_prefix: str | os.PathLike, code_dir: str | os.PathLike, params: dict,
                 out_prefix: str | os.PathLike, workers: int | None = None) -> dict:
    """``codec encode``: base cache -> code cache ``{out_prefix}.u16`` + meta; returns the meta."""
    from bitstream.bits import check_width

    for key in ("bits", "seq_len"):
        if key not in params:
            raise ValueError(f"--params: missing {key!r}")
    bits, seq_len = int(params["bits"]), int(params["seq_len"])
    if seq_len < 2:
        raise ValueError(f"seq_len = {seq_len}: a code row needs room for at least one code and [EOSEQ]")
    workers = int(workers or params.get("workers") or 1)
    tok, code_meta = load_code_tokenizer(code_dir)
    code_vocab = tok.get_vocab_size()
    check_width(code_vocab, bits, where=f"run bits = {bits} vs code tokenizer {code_dir} (vocab_size {code_vocab})")
    rows, base_meta = load_cache(base_prefix, expect={
        "format": BASE_FORMAT, "vocab_size": code_meta["base_vocab_size"],
        "eos_token_id": code_meta["eos_token_id_base"], "seq_len": code_meta["base_seq_len_tokens"]})

    t0 = time.monotonic()
    all_lengths = []
    chunks = ((rows[i:i + ROWS_PER_CHUNK], seq_len) for i in range(0, len(rows), ROWS_PER_CHUNK))
    with open_rows(out_prefix, seq_len) as sink, \
            Progress(len(rows), f"codec encode {Path(str(base_prefix)).name}", unit="row") as progress:
        for out, lengths in ordered_map(_encode_rows, chunks, workers=workers,
                                        initializer=_init_code_tokenizer, initargs=(tok.to_str(),)):
            sink.write(out)
            all_lengths.append(lengths)
            progress.update(len(out))
        seconds = time.monotonic() - t0
        lengths = np.concatenate(all_lengths) if all_lengths else np.zeros(0, dtype=np.int64)
        n_truncated = int(np.sum(lengths + 1 > seq_len))
        n_base_tokens = int(rows.shape[0] * rows.shape[1])
        meta = {
            "format": CODE_CACHE_FORMAT, "style": "owt", "split": base_meta.get("split"),
            "num_sequences": int(len(rows)), "base_sequence_len_tokens": int(rows.shape[1]),
            "code_sequence_len_tokens": seq_len, "code_vocab_size": code_vocab, "vocab_size": code_vocab,
            "pad_id": PAD_ID, "unk_id": UNK_ID, "eoseq_id": EOSEQ_ID, "bits": bits,
            "base_vocab_size": code_meta["base_vocab_size"], "eos_token_id_base": code_meta["eos_token_id_base"],
            "n_truncated": n_truncated, "truncated_fraction": n_truncated / max(1, len(rows)),
            "encoding_length_stats": encoding_length_stats(lengths) if len(lengths) else None,
            "compression_base_per_code": n_base_tokens / max(1, int(lengths.sum())),
            "base_cache": str(base_prefix), "base_cache_config_hash": base_meta.get("config_hash"),
            "code_tokenizer_sha256": code_meta.get("tokenizer_sha256"),
            "throughput": {"rows": int(len(rows)), "base_tokens": n_base_tokens, "wall_time_s": round(seconds, 3),
                           "base_tokens_per_s": round(n_base_tokens / seconds, 1) if seconds > 0 else None,
                           "workers": workers},
            **provenance(params),
        }
    meta = write_meta(out_prefix, meta, sink)
    if meta["truncated_fraction"] > TRUNCATION_WARN:
        print(f"[codec] WARNING: {n_truncated} of {len(rows)} rows ({meta['truncated_fraction']:.1%}) were "
              f"truncated to seq_len = {seq_len}", file=sys.stderr)
    print(f"[codec] {len(rows)} rows -> {cache_paths(out_prefix)[0]} ({seconds:.2f}s, "
          f"{n_base_tokens / max(seconds, 1e-9):.3g} base tok/s, {workers} worker(s))", file=sys.stderr)
    return meta


# ---------------------------------------------------------------------------------------------------
# Inverse (spec §1.5 "Inverse codec"); used by bitstream.decode


class InverseCodec:
    """Code ids -> base ids. ``pieces[c]`` is the vocabulary string of code ``c``."""

    def __init__(self, pieces: list[str], base_vocab_size: int, eos_id: int,
                 pad_id: int = PAD_ID, eoseq_id: int = EOSEQ_ID):
        self.pieces, self.base_vocab_size, self.eos_id = pieces, int(base_vocab_size), int(eos_id)
        self.pad_id, self.eoseq_id = int(pad_id), int(eoseq_id)

    @classmethod
    def from_dir(cls, code_dir: str | os.PathLike) -> "InverseCodec":
        tok, meta = load_code_tokenizer(code_dir)
        pieces = [""] * tok.get_vocab_size()
        for piece, i in tok.get_vocab(with_added_tokens=True).items():
            pieces[i] = piece
        return cls(pieces, meta["base_vocab_size"], meta["eos_token_id_base"], meta["pad_id"], meta["eoseq_id"])

    def __call__(self, codes: Sequence[int]) -> list[int]:
        kept = []
        for c in codes:
            c = int(c)
            if c == self.pad_id or c == self.eoseq_id:  # step 2: stop at the first PAD / EOSEQ
                break
            if 0 <= c < len(self.pieces):              # out-of-range codes are skipped
                kept.append(self.pieces[c])
        ids = pua_to_ids("".join(kept), self.base_vocab_size).tolist()  # steps 3-4, no separators
        if ids and ids[0] == self.eos_id:   # step 5: exactly one framing EOS each side
            ids = ids[1:]
        if ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        return ids


def inverse_codec(codes: Sequence[int], code_dir: str | os.PathLike) -> list[int]:
    """Convenience one-off inverse; for many rows build one :class:`InverseCodec` and call it."""
    return InverseCodec.from_dir(code_dir)(codes)


@stage_main("codec")
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bitstream.codec", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train (or copy) the code tokenizer")
    tr.add_argument("--base-cache", required=True, help="results/{run}/cache/train.base (prefix)")
    tr.add_argument("--params", required=True, help='{"code_tokenizer":{...}, "bits":..., "seq_len":...}')
    tr.add_argument("--out-dir", required=True, help="results/{run}/tokenizer/code")
    tr.add_argument("--workers", type=int, default=None, help="Rust threads for BPE training (default 1)")
    en = sub.add_parser("encode", help="base cache -> code cache")
    en.add_argument("--base-cache", required=True, help="results/{run}/cache/{S}.base (prefix)")
    en.add_argument("--code-dir", required=True, help="results/{run}/tokenizer/code")
    en.add_argument("--params", required=True, help='{"seq_len":..., "bits":...}')
    en.add_argument("--out", required=True, help="results/{run}/cache/{S} (prefix)")
    en.add_argument("--workers", type=int, default=None, help="encoder processes (default: params 'workers' or 1)")
    args = ap.parse_args(argv)
    params = parse_json_arg(args.params)
    threads = args.workers or params.get("workers") or 1
    os.environ.setdefault("RAYON_NUM_THREADS", str(threads if args.cmd == "train" else 1))
    try:
        if args.cmd == "train":
            build_code_tokenizer(args.base_cache, params, args.out_dir)
        else:
            encode_cache(args.base_cache, args.code_dir, params, args.out, workers=args.workers)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"codec {args.cmd}: {err}")


if __name__ == "__main__":
    main()
