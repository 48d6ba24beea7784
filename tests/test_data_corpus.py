"""Corpus stage (spec §1.1 step 1, §1.4 step 1): detokeniser, split rules, builtin/text/HF sources.

The HF sources are exercised on small local stand-ins in the shapes of the hub datasets (``lm1b``:
column "text", splits train/test; ``openwebtext``: column "text", split train), written both with
``save_to_disk`` and as a directory of parquet files -- the same loader code as for hub names.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from bitstream.corpus import BUILTIN, build_corpus, detokenize_lm1b, normalize_owt, read_split, split_of


def _texts(d: Path, split: str) -> list[str]:
    return list(read_split(d, split))


@pytest.mark.parametrize("raw, clean", [
    ("It 's a test .", "It's a test."),
    ("They 're here , are n't they ?", "They're here, aren't they?"),
    ("I do n't know !", "I don't know!"),
    ("Visit http : / / www.example.com today", "Visit http://www.example.com today"),
    ('He said " hello , world " and left .', 'He said "hello, world" and left.'),
    ("Prices ( in dollars ) rose : $ 5 to £ 7 ; see [ 1 ] .", "Prices (in dollars) rose: $5 to £7; see [1]."),
    ("We 've got ' quoted words ' here", "We've got 'quoted words' here"),
    ("   ", ""),
])
def test_lm1b_detokenizer(raw, clean):
    assert detokenize_lm1b(raw) == clean


def test_owt_normalisation():
    assert normalize_owt("  a\r\nb\rc\n\n ") == "a\nb\nc"


def test_split_sequence_is_deterministic_and_proportional():
    splits = [split_of(i, 0.1, 0.05) for i in range(10_000)]
    assert splits == [split_of(i, 0.1, 0.05) for i in range(10_000)]
    assert abs(splits.count("validation") - 1000) <= 5 and abs(splits.count("test") - 500) <= 5
    # spread over the corpus: every tenth of it holds out about its share
    for k in range(10):
        part = splits[k * 1000:(k + 1) * 1000]
        assert 90 <= part.count("validation") <= 110


def test_builtin_web_grouping_cap_and_disjoint_splits(tmp_path):
    meta = build_corpus({"style": "owt", "corpus": {"source": "builtin:web", "lines_per_document": 3,
                                                    "max_documents": 400, "validation_fraction": 0.1,
                                                    "test_fraction": 0.1}}, tmp_path)
    docs = {s: _texts(tmp_path, s) for s in ("train", "validation", "test")}
    assert sum(map(len, docs.values())) == 400 == meta["documents_read"]
    assert all(meta["splits"][s]["documents"] == len(docs[s]) for s in docs)
    assert 30 <= len(docs["validation"]) <= 50 and 30 <= len(docs["test"]) <= 50
    with gzip.open(BUILTIN["web"], "rt") as f:
        lines = [next(f).strip() for _ in range(6)]
    first_docs = [" ".join(lines[:3]), " ".join(lines[3:6])]
    everything = [d for s in docs.values() for d in s]
    assert all(d in everything for d in first_docs)           # 3 consecutive lines per document
    assert meta["source_details"]["files"][0]["sha256"]
    # same input, same output
    again = build_corpus({"style": "owt", "corpus": {"source": "builtin:web", "lines_per_document": 3,
                                                     "max_documents": 400, "validation_fraction": 0.1,
                                                     "test_fraction": 0.1}}, tmp_path / "again")
    assert again["splits"] == meta["splits"]


def test_text_source_and_empty_split_error(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("".join(f"sentence number {i} here.\n\n" for i in range(200)))
    build_corpus({"style": "lm1b", "corpus": {"source": f"text:{src}", "validation_fraction": 0.05,
                                              "test_fraction": 0.05}}, tmp_path / "c")
    total = sum(len(_texts(tmp_path / "c", s)) for s in ("train", "validation", "test"))
    assert total == 200  # blank lines are not documents
    with pytest.raises(ValueError, match="empty"):
        build_corpus({"style": "lm1b", "corpus": {"source": f"text:{src}", "max_documents": 2}}, tmp_path / "d")
    assert not list((tmp_path / "d").glob("*.jsonl")) and not list((tmp_path / "d").glob(".*tmp"))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        build_corpus({"style": "lm1b", "corpus": {"source": f"text:{tmp_path / 'nope.txt'}"}}, tmp_path / "e")


# ---------------------------------------------------------------------------------------------
# Hugging Face sources through local stand-ins


LM1B_TRAIN = [f"Sentence {i} , it 's number {i} ." for i in range(399)] + [""]
LM1B_TEST = ["The test sentence , one .", "Another ( test ) one !"]


def _lm1b_standin(root: Path, kind: str) -> Path:
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": LM1B_TRAIN}),
                               "test": datasets.Dataset.from_dict({"text": LM1B_TEST})})
    if kind == "save_to_disk":
        dd.save_to_disk(str(root))
    else:  # a hub-like repository of parquet files: data/{split}-00000-of-00001.parquet
        (root / "data").mkdir(parents=True)
        for split, ds in dd.items():
            ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


@pytest.mark.parametrize("kind", ["save_to_disk", "parquet_dir"])
def test_hf_lm1b_standin(tmp_path, kind):
    src = _lm1b_standin(tmp_path / "lm1b", kind)
    workers = 2 if kind == "parquet_dir" else 1  # the parallel detokeniser must give the same files
    meta = build_corpus({"style": "lm1b", "corpus": {"source": "hf:lm1b", "hf_path": str(src), "workers": workers}},
                        tmp_path / "c")
    train, val, test = (_texts(tmp_path / "c", s) for s in ("train", "validation", "test"))
    # 399 non-empty sentences (the empty one is dropped); validation = last round(0.005 * 399) = 2
    assert len(val) == 2 and len(train) == 397 and val == [detokenize_lm1b(t) for t in LM1B_TRAIN[397:399]]
    assert train[0] == "Sentence 0, it's number 0."
    assert test == ["The test sentence, one.", "Another (test) one!"]
    assert meta["source_details"]["dropped_empty"]["train"] == 1


def test_hf_openwebtext_standin(tmp_path):
    import datasets

    docs = [f"Doc {i}\r\nline two of {i}.  " for i in range(30)]
    docs[27] = "   "  # empty after normalisation; it sits inside the held-out tail
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs})}).save_to_disk(str(tmp_path / "owt"))
    cfg = {"source": "hf:openwebtext", "hf_path": str(tmp_path / "owt"), "validation_documents": 5}
    meta = build_corpus({"style": "owt", "corpus": cfg}, tmp_path / "c")
    train, val, test = (_texts(tmp_path / "c", s) for s in ("train", "validation", "test"))
    assert train == [normalize_owt(d) for d in docs[:25]]               # train[:-5]
    assert val == [normalize_owt(d) for d in docs[25:] if d.strip()]    # train[-5:], empties dropped
    assert test == val and "\r" not in "".join(val)
    assert meta["source_details"]["raw_documents"] == 30 and meta["source_details"]["dropped_empty"] == 1
    with pytest.raises(ValueError, match="validation_documents = 100000 leaves no training"):
        build_corpus({"style": "owt", "corpus": {**cfg, "validation_documents": None}}, tmp_path / "d")


def test_hf_missing_column_and_split_are_named(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": ["x y z"]})}).save_to_disk(str(tmp_path / "x"))
    with pytest.raises(ValueError, match="no column 'text'"):
        build_corpus({"style": "owt", "corpus": {"source": "hf:openwebtext", "hf_path": str(tmp_path / "x")}},
                     tmp_path / "c")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a b", "c d"]})}).save_to_disk(str(tmp_path / "y"))
    with pytest.raises(ValueError, match="no split 'test'"):
        build_corpus({"style": "lm1b", "corpus": {"source": "hf:lm1b", "hf_path": str(tmp_path / "y")}},
                     tmp_path / "c")


def test_cli_turns_errors_into_exit_messages(tmp_path):
    from bitstream.corpus import main

    with pytest.raises(SystemExit, match="corpus.source"):
        main(["--params", json.dumps({"corpus": {"source": "ftp:nothing"}}), "--out-dir", str(tmp_path)])
