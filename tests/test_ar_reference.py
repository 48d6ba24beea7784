"""Issue 10: the autoregressive reference — its size matches the diffusion model, its loss falls on a
toy cache, a fixed seed gives the same samples, and samples decode to text through the run's decoder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bitstream import ar_reference as ar
from bitstream import corpus, token_cache, tokenizer

torch.set_num_threads(1)
SEQ_LEN, BITS = 16, 9
ARCH = {"embed_dim": 32, "n_blocks": 1, "n_heads": 2, "dim_ff": 64, "content_dim": 8, "head_hidden": 16,
        "dropout": 0.0}


def _run(main, *args, params):
    main([*map(str, args), "--params", json.dumps(params)])


@pytest.fixture(scope="module")
def lm1b_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ar_lm1b_run")
    _run(corpus.main, "--out-dir", run / "corpus", params={
        "style": "lm1b", "corpus": {"source": "builtin:web", "max_documents": 1500,
                                    "validation_fraction": 0.05, "test_fraction": 0.05}})
    _run(tokenizer.main, "--corpus-dir", run / "corpus", "--out-dir", run / "tokenizer" / "base", params={
        "style": "lm1b", "tokenizer": {"kind": "wordpiece", "vocab_size": 300}, "bits": BITS})
    for split in ("train", "validation", "test"):
        _run(token_cache.main, "--corpus-dir", run / "corpus", "--tokenizer-dir", run / "tokenizer" / "base",
             "--split", split, "--out", run / "cache" / split,
             params={"style": "lm1b", "seq_len": SEQ_LEN, "bits": BITS})
    return run


def _params(steps=80, **training):
    return {"style": "lm1b", "bits": BITS, "seq_len": SEQ_LEN, "match_model": "sdt", "match_architecture": ARCH,
            "n_layer": 1, "n_head": 2, "n_embd": None,
            "training": {"steps": steps, "batch_size": 16, "lr": 1e-2, "warmup_steps": 5, "log_every": 5, "ema_decay": 0.9,
                         "val_every": steps, "val_batches": 2, "checkpoint_every": 1000, **training},
            "sampling": {"num_samples": 6, "micro_batch": 4}}


@pytest.fixture(scope="module")
def trained(lm1b_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("ar_model")
    meta = ar.train_ar(lm1b_run, _params(), out, device="cpu")
    return out, meta


def test_parameter_count_matches_the_diffusion_model(lm1b_run):
    target = ar.diffusion_params(ARCH, BITS, SEQ_LEN)
    vocab = 300
    for n_layer, n_head in ((1, 2), (2, 4), (3, 2)):
        cfg, n = ar.build_config({"n_layer": n_layer, "n_head": n_head, "n_embd": None, "dropout": 0.0,
                                  "param_tolerance": 0.1, "match_model": "sdt"}, vocab, SEQ_LEN, target)
        assert abs(n - target) / target <= 0.10, (n_layer, n, target)
    with pytest.raises(ValueError, match="param_tolerance"):
        ar.build_config({"n_layer": 1, "n_head": 2, "n_embd": 512, "dropout": 0.0, "param_tolerance": 0.1,
                         "match_model": "sdt"}, vocab, SEQ_LEN, target)


def test_loss_falls_and_meta_records_the_size(trained):
    out, meta = trained
    log = pd.read_parquet(out / "train_log.parquet")
    train = log.dropna(subset=["train_loss"])
    first, last = train["train_loss"].iloc[:2].mean(), train["train_loss"].iloc[-2:].mean()
    assert last < first - 0.4, (first, last)
    assert abs(meta["params"] - meta["target_params"]) / meta["target_params"] <= 0.10
    assert np.isfinite(meta["val_nll"]) and meta["val_nll"] < np.log(301) - 0.4  # uniform over 300 ids + BOS
    assert json.loads((out / ar.AR_META).read_text())["row_len"] == SEQ_LEN


def test_fixed_seed_same_samples_and_text_through_the_run_decoder(lm1b_run, trained, tmp_path):
    out, _ = trained
    kw = dict(run="r", model_name="ar")
    a = ar.sample_stage(lm1b_run, out, _params(), 3, tmp_path / "a.parquet", **kw)
    b = ar.sample_stage(lm1b_run, out, _params(), 3, tmp_path / "b.parquet", **kw)
    c = ar.sample_stage(lm1b_run, out, _params(), 4, tmp_path / "c.parquet", **kw)
    assert a["text"].tolist() == b["text"].tolist()
    assert a["model_ids"].map(list).tolist() != c["model_ids"].map(list).tolist()
    assert len(a) == 6 and all(len(ids) == SEQ_LEN for ids in a["model_ids"])
    from bitstream.decode import TextDecoder

    expected = TextDecoder.from_run_dir(lm1b_run).decode_model_ids(np.array(a["model_ids"].map(list).tolist()))
    assert a["text"].tolist() == expected.texts and all(isinstance(t, str) and t for t in a["text"])
    assert (a["sampler"] == ar.SAMPLER).all() and (a["spec"] == ar.SPEC).all()


def test_resumed_training_equals_uninterrupted(lm1b_run, tmp_path):
    straight = ar.train_ar(lm1b_run, _params(steps=12, checkpoint_every=6), tmp_path / "a", device="cpu")
    ar.train_ar(lm1b_run, _params(steps=12, checkpoint_every=6), tmp_path / "b", device="cpu", stop_after=6)
    resumed = ar.train_ar(lm1b_run, _params(steps=12, checkpoint_every=6), tmp_path / "b", device="cpu")
    assert resumed["val_nll"] == pytest.approx(straight["val_nll"], abs=1e-6)


def test_mauve_with_a_local_causal_lm_featurizer(lm1b_run, trained):
    """MAUVE runs offline with any causal LM as featurizer (here the trained AR model saved with the
    run's tokenizer): the same texts against themselves score ~1, against shuffled-token gibberish less."""
    import shutil

    from bitstream.metrics import mauve_score

    out, _ = trained
    feat_dir = out / "featurizer"
    shutil.copytree(out / "model", feat_dir, dirs_exist_ok=True)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(lm1b_run / "tokenizer" / "base")).save_pretrained(str(feat_dir))

    texts = [json.loads(line)["text"] for line in (lm1b_run / "corpus" / "test.jsonl").read_text().splitlines()[:60]]
    rng = np.random.default_rng(0)
    gibberish = [" ".join(rng.permutation(t.split())[::-1]) + " zz qq" * 5 for t in texts]
    params = {"mauve": True, "mauve_featurizer": str(feat_dir)}
    same, reason = mauve_score(texts[:30], texts[30:], params, 32, torch.device("cpu"))
    assert reason is None and 0 < same <= 1
    other, _ = mauve_score(gibberish[:30], texts[30:], params, 32, torch.device("cpu"))
    assert other < same
    missing, why = mauve_score(texts, texts, {"mauve": True, "mauve_featurizer": str(out / "nope")}, 32,
                               torch.device("cpu"))
    assert np.isnan(missing) and "nope" in why


def test_stage_defaults_agree_with_the_schema():
    import yaml

    from conftest import REPO

    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())["$defs"]["ar_model"]

    def defaults(props):
        return {k: v.get("default") for k, v in props.items() if k not in ("training", "sampling", "resources")}

    props = schema["properties"]
    assert defaults(props) == {k: v for k, v in ar.AR_DEFAULTS.items() if k not in ("training", "sampling")}
    for section in ("training", "sampling"):
        assert {k: v["default"] for k, v in props[section]["properties"].items()} == ar.AR_DEFAULTS[section]
