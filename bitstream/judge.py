"""The GenPPL judge: a causal language model that scores generated text (spec §9.2).

Two kinds, one loading path:

* ``kind: pretrained`` (paper configs): ``name`` is a hub id (``openai-community/gpt2-large``) or a local
  directory. This stage only records it in ``judge_meta.json``; nothing is downloaded here. Scoring
  loads it with ``AutoModelForCausalLM.from_pretrained(name)`` / ``AutoTokenizer.from_pretrained(name)``.
* ``kind: train`` (embedded default, spec §15 "replace GPT-2 large by a small evaluator that can be built
  offline"): a small ``GPT2LMHeadModel`` trained here on the run's training split with the run's base
  tokenizer, saved with ``save_pretrained`` into the judge directory, and loaded back through exactly
  the same ``from_pretrained`` calls.

``judge_meta.json`` is the stage's declared output and is written last, so a failed job never leaves a
judge that looks finished. It also carries the scoring settings (dtype, context, batch size) because
the metrics stage receives only the run's ``evaluation`` section.

``load_judge(judge_dir, device)`` returns a :class:`Scorer` that ``bitstream.metrics.gen_ppl`` uses.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bitstream.io import parse_json_arg, provenance, read_json, stage_main, write_json
from bitstream.progress import Progress

JUDGE_META = "judge_meta.json"
# Above this a tokenizer's model_max_length is the "no limit" sentinel of transformers, not a context.
_NO_LIMIT = 10**8
# Cap on validation blocks scored at the end of judge training (the number is a sanity check).
MAX_VAL_BLOCKS = 512


# ---------------------------------------------------------------------------------------------------
# Scorer: what the metrics stage needs from a judge


@dataclass
class Scorer:
    """A loaded judge: model in eval mode + tokenizer + the scoring settings of spec §9.2."""

    model: Any
    tokenizer: Any
    context: int          # window length: min(configured context, model positions, tokenizer max length)
    device: Any           # torch.device
    dtype: Any            # torch dtype the model runs in
    batch_size: int       # windows per forward pass when batching (1 = upstream's one-at-a-time)
    name: str
    kind: str
    pad_id: int           # any valid id: padded positions are masked and never scored

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")


def _quiet_transformers() -> None:
    """Weight-loading progress bars of transformers turn into noise in a SLURM log."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _resolve_meta(judge: str | os.PathLike) -> tuple[dict, Path]:
    path = Path(judge)
    meta_path = path / JUDGE_META if path.is_dir() else path
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path}: judge meta not found (run the judge stage first; "
                                f"expected a judge directory holding {JUDGE_META})")
    meta = read_json(meta_path)
    for key in ("kind", "source", "dtype", "context"):
        if key not in meta:
            raise ValueError(f"{meta_path}: missing key {key!r}")
    return meta, meta_path.parent


def load_judge(judge: str | os.PathLike, device: str | None = "cpu", dtype: str | None = None,
               batch_size: int | None = None, fused_gelu: bool = True) -> Scorer:
    """Load a judge directory (or its ``judge_meta.json``) for scoring (spec §9.2).

    Both kinds go through ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``:
    a trained judge from the judge directory itself, a pretrained one from its hub id or local path.
    ``dtype`` defaults to the recorded one; bfloat16 is honoured on CUDA only — on a CPU the judge runs
    in float32 (bf16 matmuls on a CPU are slow and change the numbers; the row records what ran).

    ``fused_gelu``: a GPT-2 judge's ``gelu_new`` (the tanh GELU written as six elementwise ops) runs as
    torch's one fused kernel of the same formula (``gelu_pytorch_tanh``) — the same function up to float
    rounding (with the batched path, GenPPL within 3e-8 relative of the published model scored one text
    at a time, ``benchmarks/bench_genppl.py``). Profiled on the default judge's shape, the six ops were
    about a fifth of the batched scoring time. ``False`` loads the model exactly as published.
    """
    import torch

    _quiet_transformers()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    meta, judge_dir = _resolve_meta(judge)
    source = str(judge_dir) if meta["source"] == "." else meta["source"]
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    want = dtype or meta["dtype"]
    if want not in ("float32", "bfloat16"):
        raise ValueError(f"judge dtype must be float32 or bfloat16, got {want!r}")
    torch_dtype = torch.bfloat16 if (want == "bfloat16" and device.type == "cuda") else torch.float32

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        config = AutoConfig.from_pretrained(source)
        if fused_gelu and getattr(config, "activation_function", None) == "gelu_new":
            config.activation_function = "gelu_pytorch_tanh"
        model = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=torch_dtype)
    except OSError as err:
        raise FileNotFoundError(f"judge {meta.get('name')!r}: cannot load {source!r} ({err}). "
                                f"A hub id needs network access or a filled HF cache; "
                                f"set judges.<name>.name to a local directory otherwise") from err
    model.to(device).eval()

    positions = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings")
    limits = [int(meta["context"]), int(positions)]
    if tokenizer.model_max_length and tokenizer.model_max_length < _NO_LIMIT:
        limits.append(int(tokenizer.model_max_length))
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    return Scorer(model=model, tokenizer=tokenizer, context=min(limits), device=device, dtype=torch_dtype,
                  batch_size=int(batch_size or meta.get("batch_size_score", 16)),
                  name=str(meta.get("name") or source), kind=meta["kind"], pad_id=int(pad_id))


# ---------------------------------------------------------------------------------------------------
# kind: train


def iter_texts(path: str | os.PathLike):
    """The ``{"text": ...}`` lines of a corpus split (contract: results/{run}/corpus/{split}.jsonl), lazily."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: corpus split not found")
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{n}: expected a JSON object with a 'text' key ({err})") from err


def read_texts(path: str | os.PathLike) -> list[str]:
    return list(iter_texts(path))


def document_separator(tokenizer) -> int:
    """The id put between documents: [SEP] for WordPiece (LM1B packing, §1.1), else EOS (OWT, §1.4)."""
    for tok_id in (tokenizer.sep_token_id, tokenizer.eos_token_id):
        if tok_id is not None:
            return int(tok_id)
    raise ValueError("judge tokenizer has neither a sep nor an eos token; cannot separate documents")


def pack_blocks(id_lists, separator: int, context: int, keep_remainder: bool = False) -> np.ndarray:
    """Concatenate documents, each followed by ``separator``, and cut into ``context``-token rows.

    The final partial block is dropped like the paper's packing (§1.1) unless ``keep_remainder`` and no
    full block exists (a tiny validation split still gets scored).
    """
    stream = []
    for ids in id_lists:
        if ids:
            stream.extend(ids)
            stream.append(separator)
    stream = np.asarray(stream, dtype=np.int64)
    n = len(stream) // context
    if n == 0 and keep_remainder and len(stream) >= 2:
        return stream[None, :]
    return stream[: n * context].reshape(n, context)


def _special_ids(tokenizer) -> dict:
    """bos/eos/pad for the GPT-2 config from the tokenizer (a WordPiece one has cls/sep instead)."""
    sep = document_separator(tokenizer)
    bos = next((i for i in (tokenizer.bos_token_id, tokenizer.cls_token_id) if i is not None), sep)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else sep
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return {"bos_token_id": int(bos), "eos_token_id": int(eos), "pad_token_id": int(pad)}


def _lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warm-up over 5% of the steps, then cosine decay to 10% of ``lr``."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def block_nll(model, blocks: np.ndarray, batch_size: int, device) -> tuple[float, int]:
    """Total NLL (nats) and number of predicted tokens over rows (first token of each row unscored)."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(blocks), batch_size):
            x = torch.as_tensor(blocks[i:i + batch_size], device=device)
            logits = model(input_ids=x).logits.float()
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                  reduction="sum")
            total += float(nll)
            count += x[:, 1:].numel()
    return total, count


def train_judge(corpus_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike, params: dict,
                out_dir: str | os.PathLike, name: str | None = None, device: str | None = None) -> dict:
    """Train a small GPT-2 judge on the run's training split; save it; return its meta (not written)."""
    import torch

    _quiet_transformers()
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    t0 = time.monotonic()
    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)
    context = int(params["context"])
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not (Path(tokenizer_dir) / "tokenizer_config.json").exists() and not (Path(tokenizer_dir) / "tokenizer.json").exists():
        raise FileNotFoundError(f"{tokenizer_dir}: not a tokenizer directory (no tokenizer.json / tokenizer_config.json)")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    sep = document_separator(tokenizer)

    def encode(split: str, max_tokens: int | None = None) -> list[list[int]]:
        """Token ids of a split's documents, in chunks, stopping once ``max_tokens`` are collected."""
        texts, out, total = iter_texts(corpus_dir / f"{split}.jsonl"), [], 0
        while chunk := list(itertools.islice(texts, 10_000)):
            ids = tokenizer(chunk, add_special_tokens=False)["input_ids"]
            out += ids
            total += sum(len(x) + 1 for x in ids)
            if max_tokens is not None and total >= max_tokens:
                break
        return out

    # Training sees steps x batch blocks; tokenising more of a large corpus (OWT) would only cost time.
    steps, batch = int(params["steps"]), int(params["batch_size"])
    train_blocks = pack_blocks(encode("train", max_tokens=(steps * batch + 1) * context), sep, context)
    if len(train_blocks) == 0:
        raise ValueError(f"{corpus_dir / 'train.jsonl'}: fewer tokens than one judge block of "
                         f"context {context}; lower judges.<name>.context")
    val_blocks = pack_blocks(encode("validation", max_tokens=(MAX_VAL_BLOCKS + 1) * context), sep, context,
                             keep_remainder=True)[:MAX_VAL_BLOCKS]

    torch.manual_seed(int(params["seed"]))
    cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=context, n_embd=int(params["n_embd"]),
                     n_layer=int(params["n_layer"]), n_head=int(params["n_head"]), **_special_ids(tokenizer))
    model = GPT2LMHeadModel(cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=float(params["lr"]), betas=(0.9, 0.95), weight_decay=0.01)
    gen = torch.Generator().manual_seed(int(params["seed"]))
    blocks = torch.as_tensor(train_blocks)
    print(f"[judge] GPT-2 {cfg.n_layer}x{cfg.n_embd} ({n_params:,} params), vocab {cfg.vocab_size}, "
          f"context {context}; {len(train_blocks)} train blocks, {len(val_blocks)} validation blocks; "
          f"device {device}", file=sys.stderr, flush=True)

    model.train()
    loss_val = float("nan")
    with Progress(steps, "judge train", unit="step") as progress:
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, steps, float(params["lr"]))
            x = blocks[torch.randint(len(blocks), (batch,), generator=gen)].to(device)
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            loss_val = float(loss.detach())
            progress.update(1, loss=loss_val, tok_per_step=x.numel())

    if len(val_blocks):
        val_total, val_count = block_nll(model, val_blocks, batch, device)
        val_nll = val_total / val_count
    else:
        val_nll, val_count = float("nan"), 0
    print(f"[judge] validation NLL {val_nll:.4f} nats/token, perplexity {math.exp(val_nll):.2f} "
          f"over {val_count} tokens", file=sys.stderr, flush=True)

    _save_pretrained_atomic(model.cpu(), tokenizer, out_dir)
    return {
        "name": name or f"gpt2-trained-{cfg.n_layer}x{cfg.n_embd}",
        "kind": "train",
        "source": ".",  # the judge directory itself
        "dtype": params["dtype"],
        "context": context,
        "batch_size_score": int(params["batch_size_score"]),
        "params": n_params,
        "vocab_size": cfg.vocab_size,
        "separator_id": sep,
        "train_blocks": int(len(train_blocks)),
        "train_tokens_seen": steps * batch * context,
        "final_train_loss": loss_val,
        "val_nll": val_nll,
        "val_ppl": math.exp(val_nll) if val_count else float("nan"),
        "val_tokens": int(val_count),
        "tokenizer_dir": str(tokenizer_dir),
        "corpus_dir": str(corpus_dir),
        "wall_time_s": time.monotonic() - t0,
        "device": str(device),
    }


def _save_pretrained_atomic(model, tokenizer, out_dir: Path) -> None:
    """save_pretrained into a temporary directory, then move each file into place."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".judge.*"):  # what a save killed by SIGKILL left behind
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".judge.", dir=out_dir))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for f in tmp.iterdir():
            os.replace(f, out_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# kind: pretrained


def pretrained_meta(params: dict, name: str | None = None) -> dict:
    """Record a hub id or local directory; nothing is downloaded at this stage."""
    source = params.get("name")
    if not source:
        raise ValueError("judges.<name>.name: required for kind 'pretrained' (a hub id such as "
                         "openai-community/gpt2-large, or a local directory)")
    local = Path(source).expanduser()
    if local.exists():
        if not (local / "config.json").exists():
            raise FileNotFoundError(f"judges.<name>.name: {local} exists but holds no config.json "
                                    f"(expected a save_pretrained directory)")
        source = str(local.resolve())
    return {
        "name": name or params["name"],
        "kind": "pretrained",
        "source": source,
        "dtype": params["dtype"],
        "context": int(params["context"]),
        "batch_size_score": int(params["batch_size_score"]),
    }


# ---------------------------------------------------------------------------------------------------
# CLI

JUDGE_DEFAULTS = {"name": None, "n_layer": 2, "n_embd": 128, "n_head": 4, "context": 1024, "steps": 600,
                  "batch_size": 16, "lr": 1.0e-3, "dtype": "float32", "batch_size_score": 16, "seed": 0}


def build_judge(corpus_dir, tokenizer_dir, params: dict, out_dir, name: str | None = None,
                device: str | None = None) -> dict:
    """The judge stage: train or record, then write ``judge_meta.json`` last. Returns the meta."""
    params = {**JUDGE_DEFAULTS, **params}
    kind = params.get("kind")
    out_dir = Path(out_dir)
    (out_dir / JUDGE_META).unlink(missing_ok=True)  # a failed rebuild must not leave the old meta
    if kind == "train":
        meta = train_judge(corpus_dir, tokenizer_dir, params, out_dir, name=name, device=device)
    elif kind == "pretrained":
        meta = pretrained_meta(params, name=name)
    else:
        raise ValueError(f"judge kind: expected 'train' or 'pretrained', got {kind!r}")
    meta["config"] = {k: v for k, v in params.items() if k != "resources"}
    meta.update(provenance(meta["config"]))
    write_json(out_dir / JUDGE_META, meta)
    return meta


@stage_main("judge")
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bitstream.judge", description=__doc__.split("\n")[0])
    ap.add_argument("--corpus-dir", required=True, help="results/{run}/corpus")
    ap.add_argument("--tokenizer-dir", required=True, help="results/{run}/tokenizer/base")
    ap.add_argument("--params", required=True, help="the run's judge config section (JSON or @file)")
    ap.add_argument("--out-dir", required=True, help="results/{run}/judge")
    ap.add_argument("--name", default=None, help="name recorded for the judge (e.g. the config key)")
    ap.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (the rule passes the job's "
                                                            "cpus; 0 = torch's default)")
    args = ap.parse_args(argv)
    from bitstream.cpu import setup_torch

    setup_torch(args.threads)
    try:
        meta = build_judge(args.corpus_dir, args.tokenizer_dir, parse_json_arg(args.params), args.out_dir,
                           name=args.name, device=args.device)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"judge: {err}")
    print(f"[judge] wrote {Path(args.out_dir) / JUDGE_META} ({meta['kind']}: {meta['name']})", file=sys.stderr)


if __name__ == "__main__":
    main()
