"""Model output -> token ids -> text (spec §8.8), shared by sampling, metrics and data_stats.

``TextDecoder.from_run_dir(run_dir)`` reads ``tokenizer/base`` (and ``tokenizer/code`` for OWT-style
runs) plus a cache meta for the bit width, then:

* ``decode_bits(bits [N, L*bits])`` -- MSB-first integers per ``bits``-wide group (spec §1.2), then
  as below;
* ``decode_model_ids(ids [N, L])`` -> :class:`DecodedBatch` ``(texts, model_ids, base_ids,
  n_invalid)``; ``model_ids`` are the ids exactly as given, ``base_ids`` are the ids the unigram
  entropy is computed on (spec §9.3).

Invalid codes: with ``2**bits > V`` a model can emit an id ``>= V`` (LM1B: 15 bits for 30,522 ids).
Upstream wraps such ids **modulo V** (spec §8.8, §14.12), which silently turns them into small ids
such as ``[PAD]`` / ``[unused*]``. We never wrap: an out-of-vocabulary id becomes the unknown token
(LM1B: ``[UNK]``; OWT: the code ``[UNK]``, which the inverse codec drops -- it stands for no base
id) and is counted in ``n_invalid``, so the invalid-code rate is reported instead of hidden.

LM1B-style text: tokenizer ``batch_decode`` with ``skip_special_tokens=False`` (``[SEP]`` appears
literally, as upstream) and ``clean_up_tokenization_spaces=True`` passed explicitly -- upstream got
that clean-up from the transformers default of its pinned version (spec §14.12); we do not depend
on any library default. OWT-style text: the inverse codec (spec §1.5) then the base tokenizer's
decode with specials kept (internal EOS shows as ``<|endoftext|>``) and
``clean_up_tokenization_spaces=False``: byte-level BPE decoding is exact, and the clean-up would
delete real spaces before punctuation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bitstream.io import read_json, sha256_file

SPLIT_ORDER = ("test", "validation", "train")


def tokenizer_fingerprint(run_dir: str | os.PathLike) -> str:
    """Short SHA-256 over the tokenizer file(s) that map a run's model ids to text: tokenizer/base's
    tokenizer.json, plus tokenizer/code's for OWT-style runs. Training records it in the checkpoint;
    sampling refuses a checkpoint whose fingerprint differs (ids of another tokenizer decode to
    garbage without any error)."""
    run_dir = Path(run_dir)
    files = [run_dir / "tokenizer" / "base" / "tokenizer.json"]
    if (run_dir / "tokenizer" / "code" / "tokenizer.json").exists():
        files.append(run_dir / "tokenizer" / "code" / "tokenizer.json")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: tokenizer file not found")
    import hashlib

    h = hashlib.sha256()
    for f in files:
        h.update(bytes.fromhex(sha256_file(f)))
    return h.hexdigest()[:16]


def run_data_identity(run_dir: str | os.PathLike) -> dict | None:
    """What a model trained on a run's caches must agree with to be decoded there: ``bits``,
    ``seq_len`` and ``vocab_size`` (model ids) of its cache meta and the :func:`tokenizer_fingerprint`.
    None when ``run_dir`` holds no tokenizer (e.g. caches built outside the workflow)."""
    run_dir = Path(run_dir)
    if not (run_dir / "tokenizer" / "base" / "tokenizer.json").is_file():
        return None
    cache_meta = next((read_json(p) for s in SPLIT_ORDER
                       if (p := run_dir / "cache" / f"{s}.meta.json").exists()), None)
    if cache_meta is None:
        return None
    out = {k: int(cache_meta[k]) for k in ("bits", "seq_len", "vocab_size") if cache_meta.get(k) is not None}
    return {**out, "tokenizer_sha256": tokenizer_fingerprint(run_dir)}


@dataclass
class DecodedBatch:
    """One decoded batch; every field has one entry per row."""

    texts: list[str] = field(default_factory=list)
    model_ids: list[list[int]] = field(default_factory=list)
    base_ids: list[list[int]] = field(default_factory=list)
    n_invalid: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)


class TextDecoder:
    """Decodes model ids (or bits) of one run into base ids and text."""

    def __init__(self, tokenizer, style: str, bits: int, model_vocab_size: int, unk_id: int,
                 inverse_codec=None):
        if style not in ("lm1b", "owt"):
            raise ValueError(f"style must be 'lm1b' or 'owt', got {style!r}")
        if style == "owt" and inverse_codec is None:
            raise ValueError("an OWT-style decoder needs the inverse codec (tokenizer/code)")
        self.tokenizer, self.style, self.bits = tokenizer, style, int(bits)
        self.model_vocab_size, self.unk_id, self.inverse_codec = int(model_vocab_size), int(unk_id), inverse_codec
        # Explicit on purpose, see the module docstring.
        self.clean_up_tokenization_spaces = style == "lm1b"

    @classmethod
    def from_run_dir(cls, run_dir: str | os.PathLike, bits: int | None = None) -> "TextDecoder":
        """Build from ``results/{run}``: tokenizer/base (+ tokenizer/code for OWT) and a cache meta."""
        from bitstream.tokenizer import load_tokenizer

        run_dir = Path(run_dir)
        base_dir = run_dir / "tokenizer" / "base"
        if not (base_dir / "meta.json").exists():
            raise FileNotFoundError(f"{base_dir / 'meta.json'}: base tokenizer not found")
        tokenizer, meta = load_tokenizer(base_dir)
        style = meta.get("style")
        cache_meta = next((read_json(p) for s in SPLIT_ORDER
                           if (p := run_dir / "cache" / f"{s}.meta.json").exists()), None)
        if bits is None:
            bits = (cache_meta or {}).get("bits")
        if style == "owt":
            from bitstream.codec import InverseCodec, UNK_ID

            code_dir = run_dir / "tokenizer" / "code"
            inverse = InverseCodec.from_dir(code_dir)
            code_meta = read_json(code_dir / "meta.json")
            if bits is None:
                bits = code_meta.get("bits_per_code_token")
            if code_meta["base_vocab_size"] != len(tokenizer):
                raise ValueError(f"{code_dir}/meta.json: code tokenizer built for a base vocabulary of "
                                 f"{code_meta['base_vocab_size']}, but {base_dir} has {len(tokenizer)} ids")
            model_vocab, unk = len(inverse.pieces), UNK_ID
        else:
            inverse = None
            if bits is None:
                bits = meta.get("bits")
            model_vocab = len(tokenizer)
            unk = tokenizer.unk_token_id
            if unk is None:
                raise ValueError(f"{base_dir}: tokenizer has no unknown token to stand for invalid codes")
        if bits is None:
            raise ValueError(f"{run_dir}: no bit width found in cache/*.meta.json or the tokenizer metas; pass bits=")
        return cls(tokenizer, style, int(bits), model_vocab, unk, inverse)

    # -- ids ----------------------------------------------------------------------------------------

    def base_ids(self, ids) -> tuple[list[list[int]], list[int]]:
        """Model ids ``[N, L]`` -> (base ids per row, invalid-code count per row); no text."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 2:
            raise ValueError(f"expected model ids of shape [N, L], got {ids.shape}")
        invalid = (ids < 0) | (ids >= self.model_vocab_size)
        # Out-of-vocabulary codes -> the unknown token, counted; never id mod V (spec §14.12).
        clean = np.where(invalid, self.unk_id, ids)
        n_invalid = invalid.sum(axis=1).astype(int).tolist()
        if self.style == "lm1b":
            return clean.tolist(), n_invalid
        return [self.inverse_codec(row) for row in clean], n_invalid

    def decode_model_ids(self, ids) -> DecodedBatch:
        ids = np.asarray(ids, dtype=np.int64)
        base, n_invalid = self.base_ids(ids)
        texts = self.tokenizer.batch_decode(base, skip_special_tokens=False,
                                            clean_up_tokenization_spaces=self.clean_up_tokenization_spaces)
        return DecodedBatch(texts=list(texts), model_ids=ids.tolist(), base_ids=base, n_invalid=n_invalid)

    def decode_bits(self, bits) -> DecodedBatch:
        """Hard bits ``[N, L*bits]`` (0/1, numpy or torch) -> :class:`DecodedBatch`."""
        from bitstream.bits import bits_to_ids

        ids = bits_to_ids(bits, self.bits)
        if hasattr(ids, "detach"):
            ids = ids.detach().cpu().numpy()
        return self.decode_model_ids(ids)
