"""Reproducibility of the data stages across processes: the same corpus gives byte-identical
tokenizers (Rust hash maps are seeded per process, so this needs two processes)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bitstream.corpus import main as corpus_main


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    corpus_main(["--params", json.dumps({"style": "lm1b", "corpus": {"source": "builtin:web", "max_documents": 2000}}),
                 "--out-dir", str(out)])
    return out


@pytest.mark.parametrize("kind, style, vocab", [("wordpiece", "lm1b", 700), ("bytebpe", "owt", 600)])
def test_tokenizer_training_is_identical_across_processes(corpus_dir, tmp_path, kind, style, vocab):
    params = json.dumps({"style": style, "tokenizer": {"kind": kind, "vocab_size": vocab, "lowercase": True},
                         "bits": 11})
    blobs = []
    for i in range(2):
        out = tmp_path / str(i)
        subprocess.run([sys.executable, "-m", "bitstream.tokenizer", "--corpus-dir", str(corpus_dir),
                        "--params", params, "--out-dir", str(out)], check=True, capture_output=True, timeout=120)
        blobs.append((out / "tokenizer.json").read_bytes())
    assert blobs[0] == blobs[1]
