"""Tokenizer, token caches, code tokenizer, decoding and data_stats on tiny runs (spec §1, §8.8, §9.3).

Two miniature run directories (LM1B style and OWT style, laid out like ``results/{run}``) are built
once per module through the stage CLIs; the tests then check the invariants of each layout, the
round trips and the refusals.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from bitstream import codec, corpus, data_stats, token_cache, tokenizer
from bitstream.bits import ids_to_bits
from bitstream.corpus import read_split
from bitstream.token_cache import EosFramer, SepPacker, build_cache, load_cache

SEQ_LEN, BASE_SEQ_LEN, CODE_SEQ_LEN = 16, 24, 24
LM1B_BITS, OWT_BITS = 9, 10         # wordpiece 300 <= 512; code vocab 600 <= 1024 (424 invalid codes)


def _run(main, *args, params):
    main([*map(str, args), "--params", json.dumps(params)])


@pytest.fixture(scope="module")
def lm1b_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("lm1b_run")
    _run(corpus.main, "--out-dir", run / "corpus", params={
        "style": "lm1b", "corpus": {"source": "builtin:web", "max_documents": 1500,
                                    "validation_fraction": 0.05, "test_fraction": 0.05}})
    _run(tokenizer.main, "--corpus-dir", run / "corpus", "--out-dir", run / "tokenizer" / "base", params={
        "style": "lm1b", "tokenizer": {"kind": "wordpiece", "vocab_size": 300}, "bits": LM1B_BITS})
    for split in ("train", "validation", "test"):
        _run(token_cache.main, "--corpus-dir", run / "corpus", "--tokenizer-dir", run / "tokenizer" / "base",
             "--split", split, "--out", run / "cache" / split,
             params={"style": "lm1b", "seq_len": SEQ_LEN, "bits": LM1B_BITS})
    return run


@pytest.fixture(scope="module")
def owt_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("owt_run")
    _run(corpus.main, "--out-dir", run / "corpus", params={
        "style": "owt", "corpus": {"source": "builtin:web", "lines_per_document": 4, "max_documents": 400,
                                   "validation_fraction": 0.05, "test_fraction": 0.05}})
    _run(tokenizer.main, "--corpus-dir", run / "corpus", "--out-dir", run / "tokenizer" / "base", params={
        "style": "owt", "tokenizer": {"kind": "bytebpe", "vocab_size": 300}, "bits": OWT_BITS})
    cache = {"style": "owt", "seq_len": CODE_SEQ_LEN, "base_seq_len": BASE_SEQ_LEN, "bits": OWT_BITS}
    for split in ("train", "validation", "test"):
        _run(token_cache.main, "--corpus-dir", run / "corpus", "--tokenizer-dir", run / "tokenizer" / "base",
             "--split", split, "--out", run / "cache" / split, params=cache)
    code = {"code_tokenizer": {"vocab_size": 600}, "bits": OWT_BITS, "seq_len": CODE_SEQ_LEN}
    codec.main(["train", "--base-cache", str(run / "cache" / "train.base"), "--params", json.dumps(code),
                "--out-dir", str(run / "tokenizer" / "code")])
    for split in ("train", "validation", "test"):
        codec.main(["encode", "--base-cache", str(run / "cache" / f"{split}.base"), "--code-dir",
                    str(run / "tokenizer" / "code"), "--params", json.dumps(code), "--out", str(run / "cache" / split)])
    return run


def _hf(run: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(run / "tokenizer" / "base"))


# ---------------------------------------------------------------------------------------------
# Tokenizers


def test_wordpiece_is_a_bert_tokenizer(lm1b_run):
    from transformers import BertTokenizerFast

    tok, meta = tokenizer.load_tokenizer(lm1b_run / "tokenizer" / "base")
    assert isinstance(tok, BertTokenizerFast) and len(tok) == meta["vocab_size"] == 300
    assert [tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id] == [0, 1, 2, 3, 4]
    assert meta["boundary_token_id"] == 3 and meta["kind"] == "wordpiece" and meta["style"] == "lm1b"
    assert tok.decode(tok("God SAID", add_special_tokens=False)["input_ids"]) == "god said"  # lower-cased
    assert (lm1b_run / "tokenizer" / "base" / "vocab.txt").exists()


def test_bytebpe_is_a_gpt2_tokenizer(owt_run):
    from transformers import GPT2TokenizerFast

    tok, meta = tokenizer.load_tokenizer(owt_run / "tokenizer" / "base")
    assert isinstance(tok, GPT2TokenizerFast) and len(tok) == 300
    assert tok.eos_token_id == tok.bos_token_id == 299 == meta["boundary_token_id"]  # <|endoftext|> = V - 1
    text = "Hello, World!\n  two  spaces <|endoftext|>"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text       # byte-level: lossless


def _standin(src_run: Path, dest: Path, files: list[str], config: dict) -> Path:
    """A hub-style tokenizer directory in the classic format (no tokenizer.json)."""
    dest.mkdir(parents=True)
    for f in files:
        shutil.copy(src_run / "tokenizer" / "base" / f, dest / f)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


@pytest.mark.parametrize("style", ["lm1b", "owt"])
def test_pretrained_kind_loads_classic_hub_formats(lm1b_run, owt_run, tmp_path, style):
    from transformers import BertTokenizerFast, GPT2TokenizerFast

    if style == "lm1b":  # bert-base-uncased layout: vocab.txt (+ tokenizer_config.json, config.json)
        src = _standin(lm1b_run, tmp_path / "bert-like", ["vocab.txt"], {"model_type": "bert"})
        (src / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512}))
        original, cls, bits = _hf(lm1b_run), BertTokenizerFast, LM1B_BITS
    else:                # gpt2 layout: vocab.json + merges.txt (+ config.json)
        src = _standin(owt_run, tmp_path / "gpt2-like", ["vocab.json", "merges.txt"], {"model_type": "gpt2"})
        original, cls, bits = _hf(owt_run), GPT2TokenizerFast, OWT_BITS
    meta = tokenizer.build_tokenizer(tmp_path, {"style": style, "tokenizer": {"kind": "pretrained", "name": str(src)},
                                                "bits": bits}, tmp_path / "out")
    loaded, _ = tokenizer.load_tokenizer(tmp_path / "out")
    assert isinstance(loaded, cls) and meta["vocab_size"] == len(original)
    text = "In the beginning, God created the heavens and the earth.\nUnseen: zyxqv!"
    assert loaded(text, add_special_tokens=False)["input_ids"] == original(text, add_special_tokens=False)["input_ids"]
    assert meta["boundary_token_id"] == (original.sep_token_id if style == "lm1b" else original.eos_token_id)


def test_vocabulary_overflow_names_bits_and_vocab(lm1b_run, tmp_path):
    with pytest.raises(ValueError, match=r"bits = 8 .*vocab_size 300.*does not fit 8 bits"):
        tokenizer.build_tokenizer(lm1b_run / "corpus", {"style": "lm1b", "bits": 8, "tokenizer": {
            "kind": "wordpiece", "vocab_size": 300}}, tmp_path / "tok")
    assert not (tmp_path / "tok").exists()
    with pytest.raises(ValueError, match=r"bits = 8 vs tokenizer"):
        build_cache(lm1b_run / "corpus", lm1b_run / "tokenizer" / "base", "test",
                    {"style": "lm1b", "seq_len": SEQ_LEN, "bits": 8}, tmp_path / "c" / "test")
    assert not list((tmp_path / "c").glob("*"))  # nothing half-written
    with pytest.raises(ValueError, match="not one complete row of 100000 tokens"):
        build_cache(lm1b_run / "corpus", lm1b_run / "tokenizer" / "base", "test",
                    {"style": "lm1b", "seq_len": 100000, "bits": LM1B_BITS}, tmp_path / "d" / "test")
    assert not list((tmp_path / "d").glob("*"))  # the temporary data file is gone too


# ---------------------------------------------------------------------------------------------
# Packing (LM1B) and framing (OWT)


def _random_docs(rng, n, vocab, p_empty=0.2):
    return [list(rng.integers(5, vocab, size=0 if rng.random() < p_empty else rng.integers(1, 12))) for _ in range(n)]


def test_sep_packing_invariants_and_streaming():
    rng = np.random.default_rng(0)
    sents, L, SEP = _random_docs(rng, 300, 50), 7, 3
    nonempty = [s for s in sents if s]
    stream = list(nonempty[0])
    for s in nonempty[1:]:
        stream += [SEP] + list(s)           # [SEP] between consecutive non-empty sentences only
    packer = SepPacker(L, SEP)
    parts, i = [], 0
    while i < len(sents):                   # feed in uneven batches: streaming must not matter
        k = int(rng.integers(1, 40))
        parts.append(packer.feed_lists(sents[i:i + k]))
        i += k
    blocks = np.concatenate(parts)
    assert blocks.shape == (len(stream) // L, L)
    np.testing.assert_array_equal(blocks.reshape(-1), stream[: blocks.size])
    st = packer.stats()
    assert st["total_stream_tokens"] == len(stream) and st["dropped_tail_tokens"] == len(stream) % L
    assert st["n_nonempty_examples"] == len(nonempty) and st["n_sequences"] == len(blocks)
    assert stream[0] != SEP and (blocks == SEP).sum() == sum(1 for t in stream[: blocks.size] if t == SEP)


def test_eos_framing_invariants():
    rng = np.random.default_rng(1)
    docs, B, EOS = _random_docs(rng, 200, 60), 9, 60
    stream = [t for d in docs if d for t in list(d) + [EOS]]
    framer = EosFramer(B, EOS)
    rows = np.concatenate([framer.feed_lists(docs[i:i + 13]) for i in range(0, len(docs), 13)])
    C = B - 2
    assert rows.shape == (len(stream) // C, B)
    assert (rows[:, 0] == EOS).all() and (rows[:, -1] == EOS).all()
    for k, row in enumerate(rows):
        np.testing.assert_array_equal(row[1:-1], stream[k * C:(k + 1) * C])  # consecutive stream chunks
    st = framer.stats()
    assert st["n_docs"] == sum(1 for d in docs if d) and st["n_empty_docs"] == sum(1 for d in docs if not d)
    assert st["dropped_tail_tokens"] == len(stream) % C and st["n_tokens"] == len(stream)


def test_lm1b_cache_matches_the_tokenizer(lm1b_run):
    tok = _hf(lm1b_run)
    rows, meta = load_cache(lm1b_run / "cache" / "validation",
                            expect={"format": "packed_token_blocks", "seq_len": SEQ_LEN})
    texts = list(read_split(lm1b_run / "corpus", "validation"))
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    stream = [t for k, s in enumerate(ids) for t in ([tok.sep_token_id] if k else []) + s]
    assert rows.shape == (len(stream) // SEQ_LEN, SEQ_LEN) and rows.dtype == np.uint16
    np.testing.assert_array_equal(np.asarray(rows).reshape(-1), stream[: rows.size])
    assert meta["n_sequences"] == meta["n_rows"] == len(rows) and meta["total_stream_tokens"] == len(stream)
    assert meta["dropped_tail_tokens"] == len(stream) % SEQ_LEN and meta["padded_tail_tokens"] == 0
    assert meta["packing_boundary_token_id"] == tok.sep_token_id == meta["sep_token_id"]
    assert meta["n_nonempty_lines"] == meta["n_nonempty_examples"] == len(texts)
    assert meta["add_special_tokens"] is False and meta["keep_remainder"] is False
    assert meta["throughput"]["tokens_per_s"] > 0 and meta["code_version"] and meta["config_hash"]


def test_owt_base_cache_matches_the_tokenizer(owt_run):
    tok = _hf(owt_run)
    rows, meta = load_cache(owt_run / "cache" / "test.base", expect={"format": "framed_base_sequences"})
    eos = tok.eos_token_id
    stream = [t for text in read_split(owt_run / "corpus", "test")
              for t in tok(text, add_special_tokens=False)["input_ids"] + [eos]]
    C = BASE_SEQ_LEN - 2
    assert rows.shape == (len(stream) // C, BASE_SEQ_LEN)
    assert (rows[:, 0] == eos).all() and (rows[:, -1] == eos).all()
    np.testing.assert_array_equal(np.asarray(rows)[:, 1:-1].reshape(-1), stream[: len(rows) * C])
    assert meta["content_len_tokens"] == C and meta["eos_token_id"] == meta["bos_token_id"] == eos


def test_two_workers_write_the_same_cache(lm1b_run, tmp_path):
    params = {"style": "lm1b", "seq_len": SEQ_LEN, "bits": LM1B_BITS}
    m = build_cache(lm1b_run / "corpus", lm1b_run / "tokenizer" / "base", "train", params, tmp_path / "train", workers=2)
    assert m["throughput"]["workers"] == 2
    assert (tmp_path / "train.u16").read_bytes() == (lm1b_run / "cache" / "train.u16").read_bytes()


def test_load_cache_refuses_mismatch_and_bad_size(lm1b_run, tmp_path):
    with pytest.raises(ValueError, match=r"validation\.meta\.json.*seq_len: expected 64, found 16.*tokenizer_name: "
                                         r"expected 'bert-base-uncased', found 'wordpiece-300'"):
        load_cache(lm1b_run / "cache" / "validation", expect={"seq_len": 64, "tokenizer_name": "bert-base-uncased",
                                                              "style": "lm1b"})
    for suffix in (".u16", ".meta.json"):
        shutil.copy(str(lm1b_run / "cache" / "validation") + suffix, str(tmp_path / "v") + suffix)
    with open(tmp_path / "v.u16", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError, match=r"v\.u16: \d+ bytes, but its meta .*n_rows \d+ x seq_len 16"):
        load_cache(tmp_path / "v")
    with pytest.raises(FileNotFoundError, match="nothing.meta.json"):
        load_cache(tmp_path / "nothing")


# ---------------------------------------------------------------------------------------------
# Code tokenizer (spec §1.5)


def test_code_tokenizer_meta_and_specials(owt_run):
    tok, meta = codec.load_code_tokenizer(owt_run / "tokenizer" / "code")
    assert [tok.token_to_id(s) for s in ("[PAD]", "[UNK]", "[EOSEQ]")] == [0, 1, 2]
    assert meta["actual_code_vocab_size"] == tok.get_vocab_size() <= 600 and meta["base_vocab_size"] == 300
    assert meta["base_char_offset"] == 0xF0000 and meta["bits_per_code_token"] == OWT_BITS
    assert meta["recommended_code_seq_len_tokens"] == meta["encoding_length_stats"]["max"] + 1
    base_rows, _ = load_cache(owt_run / "cache" / "train.base")
    assert meta["encoding_length_stats"]["n"] == len(base_rows)
    assert meta["encoding_length_stats"]["max"] < BASE_SEQ_LEN  # BPE compresses


def test_code_round_trip_gives_back_the_base_ids(owt_run):
    base_rows, _ = load_cache(owt_run / "cache" / "train.base")
    code_rows, meta = load_cache(owt_run / "cache" / "train", expect={"format": "code_token_rows", "style": "owt"})
    tok, _ = codec.load_code_tokenizer(owt_run / "tokenizer" / "code")
    inverse = codec.InverseCodec.from_dir(owt_run / "tokenizer" / "code")
    base_rows, code_rows = np.asarray(base_rows), np.asarray(code_rows)
    n_internal_eos = 0
    for base, code in zip(base_rows, code_rows):
        n = len(tok.encode(codec.ids_to_pua(base), add_special_tokens=False).ids)
        recovered = inverse(code)
        if n + 1 <= CODE_SEQ_LEN:    # fits: codes, [EOSEQ], then only [PAD]; exact round trip
            assert code[n] == codec.EOSEQ_ID and (code[n + 1:] == codec.PAD_ID).all()
            assert recovered == base[1:-1].tolist()      # one framing EOS stripped per side
            n_internal_eos += int((base[1:-1] == base[0]).any())
        else:                         # truncated: last id forced to [EOSEQ], a prefix comes back
            assert code[-1] == codec.EOSEQ_ID and recovered == base[1:1 + len(recovered)].tolist()
    assert n_internal_eos > 0                                   # internal EOS are kept
    assert meta["n_truncated"] < 0.5 * len(code_rows)


def test_code_encode_truncates_with_eoseq_last():
    row, truncated = codec.frame_codes(list(range(10, 40)), 8)
    assert truncated and row.tolist() == [10, 11, 12, 13, 14, 15, 16, codec.EOSEQ_ID]
    row, truncated = codec.frame_codes([10, 11], 6)
    assert not truncated and row.tolist() == [10, 11, codec.EOSEQ_ID, 0, 0, 0]


def test_code_tokenizer_refusals_and_given_path(owt_run, lm1b_run, tmp_path):
    base = owt_run / "cache" / "train.base"
    with pytest.raises(ValueError, match=r"bits = 9 vs code tokenizer .*does not fit 9 bits"):
        codec.build_code_tokenizer(base, {"code_tokenizer": {"vocab_size": 600}, "bits": 9, "seq_len": 24}, tmp_path / "a")
    with pytest.raises(ValueError, match="smaller than the base vocabulary"):
        codec.build_code_tokenizer(base, {"code_tokenizer": {"vocab_size": 250}, "bits": 10, "seq_len": 24}, tmp_path / "b")
    given = owt_run / "tokenizer" / "code" / "tokenizer.json"
    meta = codec.build_code_tokenizer(base, {"code_tokenizer": {"path": str(given)}, "bits": OWT_BITS, "seq_len": 24},
                                      tmp_path / "c")
    assert (tmp_path / "c" / "tokenizer.json").read_text() == given.read_text()
    assert meta["origin"]["copied_from"] == str(given)
    with pytest.raises(ValueError, match=r"format: expected 'framed_base_sequences', found 'packed_token_blocks'"):
        codec.encode_cache(lm1b_run / "cache" / "test", owt_run / "tokenizer" / "code",
                           {"seq_len": 24, "bits": OWT_BITS}, tmp_path / "x")


# ---------------------------------------------------------------------------------------------
# Decoding (spec §8.8) and data_stats (spec §9.3)


def test_lm1b_decode_bits_and_invalid_codes(lm1b_run):
    from bitstream.decode import TextDecoder

    dec = TextDecoder.from_run_dir(lm1b_run)
    rows, _ = load_cache(lm1b_run / "cache" / "validation")
    ids = np.asarray(rows[:8]).astype(np.int64)
    out = dec.decode_bits(ids_to_bits(ids, LM1B_BITS))
    assert dec.bits == LM1B_BITS and out.model_ids == ids.tolist() == out.base_ids and out.n_invalid == [0] * 8
    assert any("[SEP]" in t for t in out.texts)                    # specials not skipped
    tok = _hf(lm1b_run)
    assert out.texts[0] == tok.decode(ids[0].tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=True)
    bad = ids.copy()
    bad[0, :3] = [300, 301, 2**LM1B_BITS - 1]                      # out of vocabulary, fits the bits
    out = dec.decode_model_ids(bad)
    assert out.n_invalid[0] == 3 and out.base_ids[0][:3] == [tok.unk_token_id] * 3   # UNK, never id mod V
    assert out.model_ids[0][:3] == [300, 301, 511] and out.texts[0].startswith("[UNK] [UNK] [UNK]")


def test_owt_decode_uses_the_inverse_codec(owt_run):
    from bitstream.decode import TextDecoder

    dec = TextDecoder.from_run_dir(owt_run)
    codes, _ = load_cache(owt_run / "cache" / "test")
    base, _ = load_cache(owt_run / "cache" / "test.base")
    ids = np.asarray(codes[:6]).astype(np.int64)
    out = dec.decode_bits(ids_to_bits(ids, OWT_BITS))
    tok = _hf(owt_run)
    inverse = codec.InverseCodec.from_dir(owt_run / "tokenizer" / "code")
    assert out.base_ids == [inverse(r) for r in ids]
    assert out.texts == [tok.decode(b, skip_special_tokens=False, clean_up_tokenization_spaces=False) for b in out.base_ids]
    for b, full in zip(out.base_ids, np.asarray(base[:6])):
        assert b == full[1:1 + len(b)].tolist()                   # a prefix of the framed content
    bad = ids.copy()
    bad[0, 0] = 2**OWT_BITS - 1                                    # > code vocab (600): invalid
    out_bad = dec.decode_model_ids(bad)
    assert out_bad.n_invalid[0] == 1 and out_bad.n_invalid[1:] == [0] * 5
    # the invalid code became [UNK], which stands for no base id
    assert out_bad.base_ids[0] == inverse([codec.UNK_ID] + ids[0, 1:].tolist())


@pytest.mark.parametrize("style", ["lm1b", "owt"])
def test_data_stats_rows(lm1b_run, owt_run, tmp_path, style):
    import pandas as pd

    from bitstream.decode import TextDecoder
    from bitstream.entropy import unigram_entropy

    run = lm1b_run if style == "lm1b" else owt_run
    data_stats.main(["--run-dir", str(run), "--params", json.dumps({"style": style}), "--out", str(tmp_path / "s.parquet")])
    df = pd.read_parquet(tmp_path / "s.parquet")
    assert df["split"].tolist() == ["train", "validation", "test"]
    assert {"code_version", "config_hash", "run", "n_rows", "entropy"} <= set(df.columns)
    rows, _ = load_cache(run / "cache" / "test")
    ids = np.asarray(rows).astype(np.int64)
    expected = ids if style == "lm1b" else TextDecoder.from_run_dir(run).base_ids(ids)[0]
    got = df.set_index("split").loc["test"]
    assert got["entropy"] == pytest.approx(unigram_entropy(expected)) and got["n_rows"] == len(rows)
    assert got["n_invalid"] == 0
