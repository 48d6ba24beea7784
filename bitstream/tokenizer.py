"""Stage ``tokenizer``: train (or load) the base tokenizer of a run; save it for ``AutoTokenizer``.

Kinds (``tokenizer.kind``):

* ``wordpiece`` -- the bert-base-uncased recipe (spec §1.1 uses that tokenizer for LM1B): BERT
  normaliser (clean text, CJK spacing, lower-casing when ``lowercase``), BERT pre-tokeniser, WordPiece
  with ``##`` continuation and special tokens ``[PAD] [UNK] [CLS] [SEP] [MASK]`` = ids 0..4 (BERT
  has them at 0/100/101/102/103 behind ``[unused*]`` slots; a small vocabulary has no room for unused
  slots, and the ids are recorded in meta.json). Saved as a ``BertTokenizerFast`` (tokenizer.json,
  tokenizer_config.json and BERT's ``vocab.txt``).
* ``bytebpe`` -- the GPT-2 recipe (spec §1.4 uses GPT-2 for OpenWebText): byte-level pre-tokeniser
  without prefix space, BPE over the 256 byte symbols, and ``<|endoftext|>`` as the *last* id (GPT-2
  has it at 50256 = V-1); it is bos = eos = unk. Saved as a ``GPT2TokenizerFast`` (tokenizer.json plus
  GPT-2's ``vocab.json`` / ``merges.txt``).
* ``pretrained`` -- ``AutoTokenizer.from_pretrained(tokenizer.name)``, a hub id or a local directory
  (e.g. bert-base-uncased / gpt2 files made available offline), re-saved unchanged.

Training reads only the corpus ``train`` split. ``meta.json`` holds ``vocab_size`` (= ``len(tok)``,
added tokens included), the special ids, the document/sentence boundary id the caches use
(``boundary_token_id``: [SEP] for style lm1b, EOS for style owt), kind, style, and provenance.
For ``style: lm1b`` the token ids are the model input, so the vocabulary must fit ``bits``
(``bitstream.bits.check_width``). Every id must fit the uint16 caches (vocabulary <= 65,536).

``tokenizer.workers`` sets the Rust thread pool of ``tokenizers`` (``RAYON_NUM_THREADS``) for training.

CLI: ``python -m bitstream.tokenizer --corpus-dir results/{run}/corpus --params '{"style":...,
"tokenizer":{...}, "bits":N}' --out-dir results/{run}/tokenizer/base``
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from bitstream.io import atomic_dir, parse_json_arg, provenance, read_json, stage_main, write_json

WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
EOS = "<|endoftext|>"
UINT16_VOCAB = 65536
TOKENIZER_DEFAULTS = {"vocab_size": 30522, "lowercase": True, "name": None, "workers": 1}


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))


def _train_texts(corpus_dir: Path):
    from bitstream.corpus import read_split

    path = corpus_dir / "train.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: corpus train split not found (run the corpus stage first)")
    return read_split(corpus_dir, "train"), _count_lines(path)


def train_wordpiece(texts, n_texts: int, vocab_size: int, lowercase: bool = True):
    """A bert-base-uncased-style WordPiece tokenizer as a ``BertTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # cleanup=True: "hello , world" -> "hello, world", as bert-base-uncased's tokenizer.json.
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=WORDPIECE_SPECIALS,
                                        continuing_subword_prefix="##", show_progress=False)
    tok.train_from_iterator(texts, trainer, length=n_texts)
    # The trainer numbers tokens in hash-map order, which changes from process to process, so the
    # same corpus gave different ids (and different caches, models, numbers) on every run. WordPiece
    # encodes by greedy longest match over the vocabulary *set*, so renumbering is free: specials
    # first, then the rest sorted by length and spelling -- the same ids for the same corpus.
    trained = tok.get_vocab()
    rest = sorted((t for t in trained if t not in WORDPIECE_SPECIALS),
                  key=lambda t: (len(t.removeprefix("##")), t.removeprefix("##"), t.startswith("##")))
    tok.model = models.WordPiece(vocab={t: i for i, t in enumerate([*WORDPIECE_SPECIALS, *rest])},
                                 unk_token="[UNK]", max_input_chars_per_word=100, continuing_subword_prefix="##")
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    # Only used when a caller asks for special tokens; every cache of ours encodes without them.
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return BertTokenizerFast(tokenizer_object=tok, do_lower_case=lowercase, unk_token="[UNK]", sep_token="[SEP]",
                             pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]")


def train_bytebpe(texts, n_texts: int, vocab_size: int):
    """A GPT-2-style byte-level BPE tokenizer as a ``GPT2TokenizerFast``; ``<|endoftext|>`` = last id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GPT2TokenizerFast

    if vocab_size < 257 + 1:
        raise ValueError(f"tokenizer.vocab_size = {vocab_size}: a byte-level BPE needs >= 258 "
                         f"(256 bytes + 1 merge + {EOS})")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    tok.train_from_iterator(texts, trainer, length=n_texts)
    tok.add_special_tokens([EOS])  # appended after training: id = V - 1, as in GPT-2
    return GPT2TokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS)


def load_pretrained(name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise ValueError(f"tokenizer.name = {name!r}: could not load with AutoTokenizer.from_pretrained "
                         f"({type(err).__name__}: {str(err)[:300]})") from err


def special_ids(tok) -> dict:
    """The special-token ids a tokenizer defines (None where it has none)."""
    return {f"{k}_token_id": getattr(tok, f"{k}_token_id", None) for k in ("pad", "unk", "cls", "sep", "mask", "bos", "eos")}


def boundary_token_id(tok, style: str) -> int:
    """The id packed between sentences (lm1b: [SEP], spec §1.1) or appended to documents (owt: EOS, §1.4).

    Falls back to the other one when a tokenizer lacks the preferred token (e.g. a WordPiece
    tokenizer in an OWT-style run uses [SEP] as its document end).
    """
    order = ("sep", "eos") if style == "lm1b" else ("eos", "sep")
    for k in order:
        i = getattr(tok, f"{k}_token_id", None)
        if i is not None:
            return int(i)
    raise ValueError(f"tokenizer {type(tok).__name__} has neither a sep nor an eos token; a style "
                     f"{style!r} run needs one as the {'sentence separator' if style == 'lm1b' else 'document end'}")


def _save_model_files(tok, out: Path) -> None:
    """BERT's vocab.txt / GPT-2's vocab.json + merges.txt beside tokenizer.json (transformers 5 writes
    only tokenizer.json), so the directory is also in the classic formats of those hub tokenizers."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None and type(backend.model).__name__ in ("WordPiece", "BPE"):
        backend.model.save(str(out))


def build_tokenizer(corpus_dir: str | os.PathLike, params: dict, out_dir: str | os.PathLike) -> dict:
    """Train or load the base tokenizer, check it, save it with ``save_pretrained`` + meta.json."""
    style = params.get("style")
    if style not in ("lm1b", "owt"):
        raise ValueError(f"--params: style must be 'lm1b' or 'owt', got {style!r}")
    if "tokenizer" not in params:
        raise ValueError("--params: missing the 'tokenizer' section")
    cfg = {**TOKENIZER_DEFAULTS, **params["tokenizer"]}
    kind, bits = cfg.get("kind"), params.get("bits")
    os.environ.setdefault("RAYON_NUM_THREADS", str(int(cfg["workers"])))

    t0 = time.monotonic()
    n_texts = None
    if kind in ("wordpiece", "bytebpe"):
        texts, n_texts = _train_texts(Path(corpus_dir))
        if kind == "wordpiece":
            tok = train_wordpiece(texts, n_texts, int(cfg["vocab_size"]), bool(cfg["lowercase"]))
        else:
            tok = train_bytebpe(texts, n_texts, int(cfg["vocab_size"]))
        name = f"{kind}-{cfg['vocab_size']}"
    elif kind == "pretrained":
        if not cfg["name"]:
            raise ValueError("tokenizer.kind = pretrained needs tokenizer.name (a hub id or a local directory)")
        tok = load_pretrained(cfg["name"])
        name = cfg["name"]
    else:
        raise ValueError(f"tokenizer.kind: expected wordpiece | bytebpe | pretrained, got {kind!r}")
    seconds = time.monotonic() - t0

    vocab_size = len(tok)
    if vocab_size > UINT16_VOCAB:
        raise ValueError(f"tokenizer {name}: vocabulary of {vocab_size} ids does not fit the uint16 token "
                         f"caches (at most {UINT16_VOCAB})")
    # The workflow checks bits against tokenizer.vocab_size at config validation and the token cache
    # checks the real vocabulary; the rule does not pass bits, so that changing them neither reruns
    # this job nor (when they do not fit) deletes a good tokenizer and everything built on it.
    if style == "lm1b" and bits is not None:
        from bitstream.bits import check_width

        check_width(vocab_size, int(bits), where=f"run bits = {bits} vs tokenizer {name} (vocab_size {vocab_size})")
    if kind != "pretrained" and vocab_size < int(cfg["vocab_size"]):
        print(f"[tokenizer] warning: {kind} reached only {vocab_size} of the requested "
              f"{cfg['vocab_size']} ids on this corpus", file=sys.stderr)
    boundary = boundary_token_id(tok, style)

    with atomic_dir(out_dir) as tmp:  # group-readable (0755), stale leftovers of a killed run removed
        tok.save_pretrained(str(tmp))
        _save_model_files(tok, tmp)
        meta = {
            "kind": kind, "style": style, "name": name, "tokenizer_class": type(tok).__name__,
            "vocab_size": vocab_size, "requested_vocab_size": int(cfg["vocab_size"]) if kind != "pretrained" else None,
            **special_ids(tok), "boundary_token_id": boundary, "bits": bits,
            "lowercase": bool(cfg["lowercase"]) if kind == "wordpiece" else None,
            "train_documents": n_texts, "train_seconds": round(seconds, 3), "params": cfg,
            **provenance(params),
        }
        write_json(tmp / "meta.json", meta)
    print(f"[tokenizer] {name}: {vocab_size} ids ({type(tok).__name__}), boundary id {boundary}; "
          f"{seconds:.1f}s -> {out_dir}", file=sys.stderr)
    return meta


def load_tokenizer(tokenizer_dir: str | os.PathLike):
    """``(AutoTokenizer, meta)`` of a directory written by this stage."""
    from transformers import AutoTokenizer

    tokenizer_dir = Path(tokenizer_dir)
    meta = read_json(tokenizer_dir / "meta.json")
    return AutoTokenizer.from_pretrained(str(tokenizer_dir)), meta


@stage_main("tokenizer")
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bitstream.tokenizer", description=__doc__.split("\n")[0])
    ap.add_argument("--corpus-dir", required=True, help="results/{run}/corpus")
    ap.add_argument("--params", required=True, help='{"style":..., "tokenizer":{...}, "bits":N} (JSON or @file)')
    ap.add_argument("--out-dir", required=True, help="results/{run}/tokenizer/base")
    args = ap.parse_args(argv)
    try:
        build_tokenizer(args.corpus_dir, parse_json_arg(args.params), args.out_dir)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"tokenizer: {err}")


if __name__ == "__main__":
    main()
