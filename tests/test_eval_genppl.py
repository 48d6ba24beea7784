"""GenPPL (spec §9.2), unigram entropy (§9.3), the judge stage and the metrics rows, on a tiny random
GPT-2 saved with save_pretrained and loaded back through the judge's from_pretrained path."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from bitstream import judge as judge_mod
from bitstream import metrics
from bitstream.io import write_json

torch.set_num_threads(1)

WORDS = [f"w{i}" for i in range(40)]
CONTEXT = 8  # small, so texts span several windows


def make_tokenizer(path):
    """A word-level tokenizer (one id per 'wN', [SEP] for separators) saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[SEP]": 1, "[PAD]": 2, "[CLS]": 3}
    vocab.update({w: i + 4 for i, w in enumerate(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]",
                                   pad_token="[PAD]", cls_token="[CLS]")
    fast.save_pretrained(path)
    return fast


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    """A judge directory as the judge stage leaves it: random GPT-2 + tokenizer + judge_meta.json."""
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path_factory.mktemp("judge")
    tok = make_tokenizer(d)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=CONTEXT, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=3, eos_token_id=1, pad_token_id=2)
    GPT2LMHeadModel(cfg).save_pretrained(d)
    write_json(d / judge_mod.JUDGE_META, {"name": "tiny", "kind": "train", "source": ".", "dtype": "float32",
                                          "context": 1024, "batch_size_score": 4})
    return d


@pytest.fixture(scope="module")
def scorer(judge_dir):
    return judge_mod.load_judge(judge_dir, device="cpu")


def random_texts(n, seed=0, lo=0, hi=30):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(lo, hi))) for _ in range(n)]


def direct_nll(texts, scorer):
    """Σ NLL and scored-token count, brute force: one forward pass per scored token (spec §9.2).

    Token j of a text of L tokens with context C: with k = L // C full windows, a token inside them
    (j < kC) is scored from the start of its window (none if it is that window's first token); a
    token of the remainder (j >= kC, L > C) is scored from the right-aligned window's start L − C.
    """
    total, count = 0.0, 0
    C = scorer.context
    for text in texts:
        ids = scorer.tokenizer(text, add_special_tokens=False)["input_ids"]
        L = len(ids)
        if L < 2:
            continue
        full = L // C if L > C else 0
        for j in range(1, L):
            if L <= C:
                begin = 0
            elif j < full * C:
                begin = j - j % C
                if begin == j:
                    continue
            else:
                begin = L - C
            with torch.no_grad():
                logits = scorer.model(torch.tensor([ids[begin:j + 1]])).logits[0, -2]
            total -= float(torch.log_softmax(logits.double(), -1)[ids[j]])
            count += 1
    return total, count


def test_load_judge_context_is_model_limit(scorer):
    # meta says 1024, the model has 8 positions: windows must fit the model
    assert scorer.context == CONTEXT
    assert not scorer.model.training and scorer.dtype_name == "float32"


def test_gen_ppl_equals_direct_computation(scorer):
    texts = random_texts(12) + ["", "w1", "w2 w3"]  # two texts below 2 tokens are skipped
    total, count = direct_nll(texts, scorer)
    res = metrics.gen_ppl(texts, scorer, batch_size=1)
    assert res.n_scored_tokens == count
    assert res.n_texts_skipped == sum(len(t.split()) < 2 for t in texts)
    assert res.nll == pytest.approx(total / count, rel=1e-5)
    assert res.ppl == pytest.approx(math.exp(total / count), rel=1e-5)
    assert res.bpt == pytest.approx(res.nll / math.log(2))


def test_windows_first_token_unscored_final_window_right_aligned(scorer):
    # 20 tokens, context 8: windows [0,8) [8,16) score 7 + 7; the right-aligned [12,20) scores 16..19
    assert [(w[0], w[-1], first) for w, first in metrics._windows(list(range(20)), 8)] == \
        [(0, 7, 1), (8, 15, 1), (12, 19, 4)]
    text = " ".join(WORDS[:20])
    for bs in (1, 3):
        res = metrics.gen_ppl([text], scorer, batch_size=bs)
        assert res.n_windows == 3 and res.n_scored_tokens == 18
    # 17 tokens: the last token is scored with the 7 before it as context
    res = metrics.gen_ppl([" ".join(WORDS[:17])], scorer, batch_size=1)
    assert res.n_windows == 3 and res.n_scored_tokens == 15
    # exactly 2 C: two full windows, nothing right-aligned; at most C: one window
    assert [first for _, first in metrics._windows(list(range(16)), 8)] == [1, 1]
    assert metrics._windows(list(range(8)), 8) == [(list(range(8)), 1)] and metrics._windows([5], 8) == []
    # brute force, one forward pass per token, over texts of 0..3 C tokens
    texts = [" ".join(WORDS[:n]) for n in (1, 2, 7, 8, 9, 15, 16, 17, 23, 24)]
    total, count = direct_nll(texts, scorer)
    for bs in (1, 4):
        res = metrics.gen_ppl(texts, scorer, batch_size=bs)
        assert res.n_scored_tokens == count
        assert res.total_nll == pytest.approx(total, rel=1e-6)


def test_batched_equals_one_at_a_time(scorer):
    texts = random_texts(30, seed=1)
    one = metrics.gen_ppl(texts, scorer, batch_size=1)
    batched = metrics.gen_ppl(texts, scorer, batch_size=7)
    assert batched.n_scored_tokens == one.n_scored_tokens
    assert batched.ppl == pytest.approx(one.ppl, rel=1e-6)
    np.testing.assert_allclose(batched.text_nll, one.text_nll, rtol=1e-5, equal_nan=True)


def test_scoring_shortcuts_change_nothing_but_rounding(judge_dir, scorer, monkeypatch):
    """The fused GELU and the head run on scored positions only (issue 12) against the model exactly as
    published, scored one text at a time (upstream) and batched through the full-logits path."""
    published = judge_mod.load_judge(judge_dir, device="cpu", fused_gelu=False)
    assert published.model.config.activation_function == "gelu_new"
    assert scorer.model.config.activation_function == "gelu_pytorch_tanh"
    texts = random_texts(30, seed=2) + [" ".join(WORDS[:19])]  # one text spans windows
    upstream = metrics.gen_ppl(texts, published, batch_size=1)
    fast = metrics.gen_ppl(texts, scorer, batch_size=5)
    monkeypatch.setattr(metrics, "PLAIN_HEAD", frozenset())  # the generic path: full logits, then gather
    full_logits = metrics.gen_ppl(texts, published, batch_size=5)
    for res in (fast, full_logits):
        assert res.n_scored_tokens == upstream.n_scored_tokens
        assert res.ppl == pytest.approx(upstream.ppl, rel=1e-6)
        np.testing.assert_allclose(res.text_nll, upstream.text_nll, rtol=1e-5)


def test_unigram_entropy_closed_forms():
    # hand computed: [1,1,2,3] -> p = (1/2, 1/4, 1/4) -> 1.5 ln 2; [5,5] -> 0; mean of both
    assert metrics.unigram_entropy([[1, 1, 2, 3]]) == pytest.approx(1.5 * math.log(2))
    assert metrics.unigram_entropy([[7] * 50]) == 0.0
    for k in (2, 5, 16):
        assert metrics.unigram_entropy([list(range(k)) * 3]) == pytest.approx(math.log(k))
    assert metrics.unigram_entropy([[1, 1, 2, 3], [5, 5]]) == pytest.approx(0.75 * math.log(2))


def sample_frame(texts, seed=0):
    rng = np.random.default_rng(seed)
    n = len(texts)
    return pd.DataFrame({
        "run": "r", "model": "m", "spec": "sto", "seed": seed, "sample_index": np.arange(n),
        "model_ids": [rng.integers(0, 50, 6).tolist() for _ in range(n)],
        "base_ids": [rng.integers(0, 4, 6).tolist() for _ in range(n)],
        "text": texts, "n_invalid": [1] + [0] * (n - 1),
        "sampler": "ddim_entropic", "nfe": 16, "gamma": 0.1, "s_noise": 1.003, "wall_time_s": 2.0,
        "samples_per_s": n / 2.0, "code_version": "gen123", "config_hash": "genhash",
    })


def test_metrics_cli_row(tmp_path, judge_dir, scorer):
    texts = random_texts(6, seed=3, lo=3)
    df = sample_frame(texts)
    samples = tmp_path / "seed0.parquet"
    df.to_parquet(samples)
    out = tmp_path / "metrics" / "seed0.parquet"
    metrics.main(["--samples", str(samples), "--judge-dir", str(judge_dir), "--device", "cpu",
                  "--params", json.dumps({"real_samples": 8, "mauve": False}), "--out", str(out)])
    row = pd.read_parquet(out).iloc[0]
    assert (row["run"], row["model"], row["spec"], row["seed"]) == ("r", "m", "sto", 0)
    assert row["gen_ppl"] == pytest.approx(metrics.gen_ppl(texts, scorer).ppl, rel=1e-6)
    assert row["entropy"] == pytest.approx(metrics.unigram_entropy(df["base_ids"]))
    assert row["invalid_code_rate"] == pytest.approx(1 / 36)
    assert row["n_samples"] == 6 and row["judge_name"] == "tiny" and row["judge_context"] == CONTEXT
    assert math.isnan(row["mauve"]) and "disabled" in row["mauve_skipped_reason"]
    # generation metadata carried; the sampler's provenance kept apart from this job's
    assert row["nfe"] == 16 and row["gamma"] == 0.1 and row["samples_per_s"] == 3.0
    assert row["gen_code_version"] == "gen123" and row["config_hash"] != "genhash"


def test_metrics_refuses_bad_sample_file(tmp_path, judge_dir):
    bad = tmp_path / "bad.parquet"
    pd.DataFrame({"text": ["w1 w2"]}).to_parquet(bad)
    with pytest.raises(SystemExit, match="missing columns"):
        metrics.main(["--samples", str(bad), "--judge-dir", str(judge_dir), "--params", "{}",
                      "--out", str(tmp_path / "o.parquet")])


def test_real_row_scores_decoded_test_rows(monkeypatch, tmp_path, scorer):
    texts = random_texts(5, seed=4, lo=2)
    batch = SimpleNamespace(texts=texts, base_ids=[[1, 2, 2, 3]] * 5, model_ids=[[1, 2, 2, 3]] * 5,
                            n_invalid=[0] * 5)
    monkeypatch.setattr(metrics, "reference_batch", lambda run_dir, n: (batch, 5))
    row = metrics.real_row(tmp_path / "lm1b_web", scorer, {"real_samples": 5})
    assert (row["run"], row["model"], row["spec"]) == ("lm1b_web", "real", "real")
    assert row["gen_ppl"] == pytest.approx(metrics.gen_ppl(texts, scorer).ppl, rel=1e-6)
    assert row["entropy"] == pytest.approx(1.5 * math.log(2)) and row["invalid_code_rate"] == 0.0


def test_judge_train_and_pretrained_share_the_loading_path(tmp_path):
    """kind train: trains, saves, writes meta last; kind pretrained on that directory scores identically."""
    tok_dir, corpus = tmp_path / "tok", tmp_path / "corpus"
    make_tokenizer(tok_dir)
    corpus.mkdir()
    rng = np.random.default_rng(0)
    # a learnable corpus: runs of consecutive words
    def doc():
        s = int(rng.integers(0, 30))
        return {"text": " ".join(WORDS[s:s + int(rng.integers(3, 10))])}
    for split, n in (("train", 300), ("validation", 30)):
        (corpus / f"{split}.jsonl").write_text("".join(json.dumps(doc()) + "\n" for _ in range(n)))
    params = {"kind": "train", "n_layer": 1, "n_embd": 32, "n_head": 2, "context": 16, "steps": 60,
              "batch_size": 8, "lr": 3e-3, "dtype": "bfloat16", "batch_size_score": 4, "seed": 0}
    out = tmp_path / "judge"
    judge_mod.main(["--corpus-dir", str(corpus), "--tokenizer-dir", str(tok_dir), "--params",
                    json.dumps(params), "--out-dir", str(out), "--name", "gpt2_small_local", "--device", "cpu"])
    meta = json.loads((out / "judge_meta.json").read_text())
    assert meta["kind"] == "train" and meta["name"] == "gpt2_small_local" and meta["context"] == 16
    assert meta["separator_id"] == 1 and meta["params"] > 0 and meta["code_version"]
    # learned something: far better than the uniform 44-way guess
    assert math.isfinite(meta["val_ppl"]) and meta["val_ppl"] < 20

    trained = judge_mod.load_judge(out, device="cpu")
    assert trained.dtype_name == "float32"  # bf16 requested, CPU runs float32
    texts = [d["text"] for d in map(json.loads, (corpus / "validation.jsonl").read_text().splitlines())]
    ppl_trained = metrics.gen_ppl(texts, trained).ppl

    pre = tmp_path / "pre"
    judge_mod.main(["--corpus-dir", str(corpus), "--tokenizer-dir", str(tok_dir), "--out-dir", str(pre),
                    "--params", json.dumps({"kind": "pretrained", "name": str(out), "context": 1024})])
    meta = json.loads((pre / "judge_meta.json").read_text())
    assert meta["kind"] == "pretrained" and meta["source"] == str(out.resolve())
    assert metrics.gen_ppl(texts, judge_mod.load_judge(pre, device="cpu")).ppl == pytest.approx(ppl_trained)

    with pytest.raises(SystemExit, match="name: required"):
        judge_mod.main(["--corpus-dir", str(corpus), "--tokenizer-dir", str(tok_dir), "--out-dir",
                        str(tmp_path / "x"), "--params", json.dumps({"kind": "pretrained"})])
