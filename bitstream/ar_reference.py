"""The autoregressive reference: a causal transformer LM of the diffusion model's size (issue 10).

The paper's title claim is that the gap to an autoregressive model *of the same size* is closing;
Table 1 has an "AR reference" row. This stage trains such a model on the same run's tokens, samples it
ancestrally at temperature 1 to the same length, and writes a sample parquet in the format of
``bitstream.sample``, so that the ordinary ``metrics`` rule scores it with the same judge (never the
AR model itself) and it lands in the summary, Table 1 and the ablation table like any other row.

* Model: ``transformers.GPT2LMHeadModel`` (learned positions, pre-LayerNorm, GELU MLP, LM head tied
  to the token embedding), ``n_layer`` × ``n_embd``, ``n_head`` heads. With ``n_embd: null`` the width
  is chosen so that the parameter count is closest to the diffusion model named by ``match_model``
  (its count on the run's ``bits`` and ``seq_len``, ``bitstream.model.count_params``); the stage
  refuses a model whose count is more than ``param_tolerance`` (10 %) away.
* Data (documented choice): LM1B style — the diffusion model's own ``[SEP]``-packed blocks of
  ``seq_len`` WordPiece ids (``cache/{split}.u16``). OWT style — the framed *base-token* sequences
  (``cache/{split}.base.u16``, ``[EOS] + ids + [EOS]`` of ``base_seq_len`` byte-BPE ids), not the
  second-stage code tokens: an AR model on base tokens is the ordinary GPT-2-style reference, and the
  code tokenizer exists to shorten sequences for the diffusion model, not for the AR one.
* Every training row is prefixed with a BOS id = vocabulary size (an extra embedding row), so the
  model also learns the distribution of the first token and sampling starts from BOS alone.
* Sampling: ``model.generate(do_sample=True, temperature=1, top_k=0, top_p=1)`` from BOS for exactly
  the row length (no early stop). Text goes through the run's decoder (``TextDecoder``): LM1B rows are
  decoded like diffusion samples; OWT rows have their framing EOS stripped like the inverse codec's
  output, then are decoded by the base tokenizer. A generated BOS (the model never sees one after
  position 0, but nothing forbids it) becomes the unknown token and counts as an invalid code.
  The micro-batch starting at sample ``i`` is generated under ``torch.manual_seed(derive_seed(seed,
  "noise", i))``: a fixed seed gives the same samples (for a fixed ``micro_batch``).
* Training reuses the diffusion trainer's model-agnostic pieces (issue 14): the deterministic global
  batch order (``train_data.GlobalBatches``), AdamW + warm-up/cosine lr + EMA + the update
  (``train_optim``), the resumable state and ``last.pt`` (``train_state.TrainState``), and the process
  set-up (``distributed``). Validation and the shipped weights are the EMA's, as for the SDT.

CLI::

    python -m bitstream.ar_reference train --run-dir results/{run} --params '<json>' --out-dir results/{run}/ar/{name}
    python -m bitstream.ar_reference sample --run-dir results/{run} --model-dir results/{run}/ar/{name} \\
        --params '<json>' --seed S --run R --model NAME --out results/{run}/samples/{name}/ancestral/seed{S}.parquet
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

from bitstream.cpu import setup_torch
from bitstream.io import parse_json_arg, provenance, read_json, write_json, write_parquet, stage_main
from bitstream.train_data import derive_seed

SAMPLER = "ar_ancestral"   # the 'sampler' of its rows (Table 1 labels them "AR reference")
SPEC = "ancestral"         # the spec wildcard of its sample / metric files
AR_META = "ar_meta.json"

AR_DEFAULTS = {
    "match_model": None, "param_tolerance": 0.10, "n_layer": 2, "n_head": 4, "n_embd": None, "dropout": 0.0,
    "training": {"steps": 1000, "batch_size": 32, "lr": 1.0e-3, "min_lr": 1.0e-5, "warmup_steps": 100,
                 "weight_decay": 0.01, "betas": [0.9, 0.99], "eps": 1.0e-8, "grad_clip": 1.0, "ema_decay": 0.995,
                 "checkpoint_every": 250, "log_every": 25, "val_every": 250, "val_batches": 4, "seed": 42,
                 "num_threads": 0},
    "sampling": {"num_samples": 64, "micro_batch": 64, "temperature": 1.0},
}


def fill_defaults(params: dict) -> dict:
    out = {**AR_DEFAULTS, **{k: v for k, v in params.items() if k not in ("training", "sampling")}}
    out["training"] = {**AR_DEFAULTS["training"], **(params.get("training") or {})}
    out["sampling"] = {**AR_DEFAULTS["sampling"], **(params.get("sampling") or {})}
    return out


# ---------------------------------------------------------------------------------------------------
# Data


def data_prefix(run_dir: Path, style: str, split: str) -> Path:
    """The cache the AR model reads (see the module docstring for the choice)."""
    return Path(run_dir) / "cache" / (f"{split}.base" if style == "owt" else split)


def load_rows(run_dir: Path, style: str, split: str) -> tuple[np.ndarray, dict]:
    from bitstream.token_cache import load_cache

    return load_cache(data_prefix(run_dir, style, split))


def vocab_size_of(meta: dict, where: str) -> int:
    v = meta.get("vocab_size")
    if v is None:
        raise ValueError(f"{where}: cache meta has no vocab_size")
    return int(v)


# ---------------------------------------------------------------------------------------------------
# Model and its size


def gpt2_config(vocab_size: int, row_len: int, n_layer: int, n_head: int, n_embd: int, dropout: float = 0.0):
    """GPT-2 config for ``vocab_size`` ids plus BOS (= ``vocab_size``), context BOS + ``row_len``."""
    from transformers import GPT2Config

    bos = int(vocab_size)
    return GPT2Config(vocab_size=bos + 1, n_positions=int(row_len) + 1, n_embd=int(n_embd), n_layer=int(n_layer),
                      n_head=int(n_head), resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                      bos_token_id=bos, eos_token_id=None, pad_token_id=bos, tie_word_embeddings=True)


def count_ar_params(cfg) -> int:
    """Parameters of a GPT2LMHeadModel (tied head counted once), built on the meta device."""
    import torch
    from transformers import GPT2LMHeadModel

    with torch.device("meta"):
        model = GPT2LMHeadModel(cfg)
    return sum(p.numel() for p in model.parameters())


def diffusion_params(architecture: dict, bits: int, seq_len: int) -> int:
    from bitstream.model import SDTConfig, count_params

    return count_params(SDTConfig.from_params(dict(architecture), bits=bits, seq_len=seq_len))


def matched_width(target: int, vocab_size: int, row_len: int, n_layer: int, n_head: int) -> int:
    """The ``n_embd`` (a multiple of ``n_head``) whose parameter count is closest to ``target``.

    GPT-2's count grows monotonically in the width (``(V+T)·d + L·(12d² + 13d) + 2d``), so a bisection
    over multiples of ``n_head`` finds the crossing; the closer neighbour wins.
    """
    def count(d):
        return count_ar_params(gpt2_config(vocab_size, row_len, n_layer, n_head, d))

    lo, hi = 1, 1
    while count(hi * n_head) < target:
        lo, hi = hi, hi * 2
        if hi > 1 << 14:
            break
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(mid * n_head) < target:
            lo = mid
        else:
            hi = mid
    return min((lo * n_head, hi * n_head), key=lambda d: abs(count(d) - target))


def build_config(p: dict, vocab_size: int, row_len: int, target_params: int | None):
    """(GPT2Config, its parameter count) from the AR config; checks the tolerance against ``target_params``."""
    n_embd = p.get("n_embd")
    if n_embd is None:
        if target_params is None:
            raise ValueError("ar_models.<name>.n_embd: null needs match_model (whose size to match)")
        n_embd = matched_width(target_params, vocab_size, row_len, int(p["n_layer"]), int(p["n_head"]))
    if int(n_embd) % int(p["n_head"]):
        raise ValueError(f"ar_models.<name>: n_embd {n_embd} is not a multiple of n_head {p['n_head']}")
    cfg = gpt2_config(vocab_size, row_len, int(p["n_layer"]), int(p["n_head"]), int(n_embd), float(p["dropout"]))
    n = count_ar_params(cfg)
    if target_params is not None:
        rel = abs(n - target_params) / target_params
        if rel > float(p["param_tolerance"]):
            raise ValueError(f"ar_models.<name>: {n:,} parameters vs {target_params:,} of {p['match_model']} "
                             f"({rel:.1%} off, param_tolerance {float(p['param_tolerance']):.0%}); "
                             f"set n_embd: null to size it automatically, or change n_layer")
    return cfg, n


def with_bos(rows: np.ndarray, bos: int) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.int64)
    return np.concatenate([np.full((len(rows), 1), bos, dtype=np.int64), rows], axis=1)


# ---------------------------------------------------------------------------------------------------
# Training (shared pieces of bitstream.train_*: batches, lr schedule, EMA, update, resumable state)


def _val_nll(model, rows: np.ndarray, bos: int, batch: int, device) -> tuple[float, int]:
    """Mean NLL per token (nats) of ``rows`` with BOS prefixed: every real token is scored."""
    from bitstream.judge import block_nll

    if len(rows) == 0:
        return float("nan"), 0
    total, count = block_nll(model, with_bos(rows, bos), batch, device)
    return total / count, count


def train_ar(run_dir, params: dict, out_dir, device: str | None = None, stop_after: int | None = None,
             quiet: bool = False, threads: int | None = None) -> dict:
    """Train (or resume from ``{out_dir}/checkpoints/last.pt``) the AR reference; write the EMA model
    (``model/``), ``train_log.parquet`` and, last, ``ar_meta.json``. Returns the meta."""
    import pandas as pd
    import torch
    from transformers import GPT2LMHeadModel

    from bitstream.distributed import setup_distributed, shutdown
    from bitstream.train import wrap_for_training
    from bitstream.train_data import GlobalBatches, data_fingerprint, rows_to_ids
    from bitstream.train_optim import EMA, WarmupCosine, make_optimizer, optimizer_step
    from bitstream.train_state import TrainState

    from bitstream.judge import _quiet_transformers

    _quiet_transformers()
    p = fill_defaults(params)
    t = p["training"]
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    style = p.get("style")
    if style not in ("lm1b", "owt"):
        raise ValueError(f"--params: style must be 'lm1b' or 'owt', got {style!r}")
    dist = setup_distributed(device)
    log = (lambda *a: None) if (quiet or not dist.main) else (lambda *a: print("[ar]", *a, file=sys.stderr, flush=True))
    try:
        # subnormals flushed, intra-op threads = the job's cpus (bitstream.cpu, issue 12)
        setup_torch(threads or int(t["num_threads"]) or max(1, int((p.get("resources") or {}).get("cpus", 1))))
        train_rows, train_meta = load_rows(run_dir, style, "train")
        val_rows, _ = load_rows(run_dir, style, "validation")
        where = str(data_prefix(run_dir, style, "train"))
        vocab, row_len = vocab_size_of(train_meta, where), int(train_rows.shape[1])
        target = None
        if p.get("match_model") is not None:
            if "match_architecture" not in p:
                raise ValueError("--params: match_model given without match_architecture (the workflow passes it)")
            target = diffusion_params(p["match_architecture"], int(p["bits"]), int(p["seq_len"]))
        cfg, n_params = build_config(p, vocab, row_len, target)
        bos = int(vocab)
        steps, batch = int(t["steps"]), int(t["batch_size"])
        if batch % dist.world_size:
            raise ValueError(f"ar_models.<name>.training.batch_size {batch} is not divisible by {dist.world_size} processes")

        torch.manual_seed(int(t["seed"]))
        model = GPT2LMHeadModel(cfg).to(dist.device)
        opt = make_optimizer(model, t)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(t["lr"], t["min_lr"], t["warmup_steps"], steps))
        state = TrainState(model, EMA(model, t["ema_decay"]), opt, sched, generators={})
        torch.manual_seed(derive_seed(int(t["seed"]), "dropout", dist.rank))
        saved_config = {"ar": {k: v for k, v in p.items() if k not in ("resources", "sampling")},
                        "gpt2": {"n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd,
                                 "vocab_size": cfg.vocab_size, "n_positions": cfg.n_positions},
                        "data": {"train_rows": int(len(train_rows)), "vocab_size": vocab,
                                 "train_fingerprint": data_fingerprint(Path(f"{where}.u16"))}}
        batches = GlobalBatches(len(train_rows), batch, int(t["seed"]))
        last = out_dir / "checkpoints" / "last.pt"
        if last.exists():
            state.load(last, dist, config=saved_config, seed=int(t["seed"]), log=log)
            log(f"resumed from {last} at step {state.step}/{steps}")
        else:
            log(f"GPT-2 {cfg.n_layer}x{cfg.n_embd} ({n_params:,} parameters"
                + (f"; {p['match_model']}: {target:,}" if target else "") + f"), vocab {vocab} + BOS, rows of "
                f"{row_len} from {where}.u16 ({len(train_rows):,} rows), batch {batch}, {steps} steps on {dist.device}")
        net = wrap_for_training(model, {"compile": False}, dist)
        n_val = min(len(val_rows), int(t["val_batches"]) * batch)
        t_start = time.monotonic()

        def save_last():
            state.save(last, dist, config=saved_config, data_position=batches.position(state.step),
                       provenance=provenance(saved_config), wall_time_s=state.wall_before + time.monotonic() - t_start)

        target_step = steps if stop_after is None else min(steps, int(stop_after))
        model.train()
        while state.step < target_step:
            t0 = time.monotonic()
            ids = rows_to_ids(train_rows, batches.indices(state.step, dist.rank, dist.world_size))
            x = torch.from_numpy(with_bos(ids, bos)).to(dist.device)
            opt.zero_grad(set_to_none=True)
            # labels shift inside: BOS is never a target; the mask says "no padding" (pad id = BOS)
            loss = net(input_ids=x, attention_mask=torch.ones_like(x), labels=x).loss
            grad_norm = optimizer_step(loss, model, opt, sched, state.ema, float(t["grad_clip"]))
            state.step += 1
            state.interval.add(float(loss.detach()), grad_norm, torch.zeros(0), time.monotonic() - t0)
            step = state.step
            val = float("nan")
            if step % int(t["val_every"]) == 0 or step == steps:
                val, _ = _val_nll(state.ema.model, val_rows[:n_val], bos, batch, dist.device)
                model.train()
            if step % int(t["log_every"]) == 0 or step % int(t["val_every"]) == 0 or step == steps:
                iv = state.interval
                state.log_rows.append({"step": step, "train_loss": iv.loss / iv.steps, "val_nll": val,
                                       "lr": sched.get_last_lr()[0], "grad_norm": iv.grad_norm / iv.steps,
                                       "steps_per_s": iv.steps / iv.train_time if iv.train_time > 0 else float("nan"),
                                       "wall_time_s": state.wall_before + time.monotonic() - t_start})
                state.interval.reset()
            if step % int(t["checkpoint_every"]) == 0 or step == target_step:
                save_last()
        if state.step < steps:
            log(f"stopped at step {state.step}/{steps}; {last} saved")
            return {"step": state.step, "stopped": True, "params": n_params, "target_params": target,
                    "val_nll": float("nan")}
        if not dist.main:
            return {}
        val_nll, val_tokens = _val_nll(state.ema.model, val_rows[:n_val], bos, batch, dist.device)
        state.ema.model.cpu().save_pretrained(str(out_dir / "model"))
        df = pd.DataFrame(state.log_rows)
        for k, v in provenance(saved_config).items():
            df[k] = v
        write_parquet(out_dir / "train_log.parquet", df)
        rates = df["steps_per_s"].replace([np.inf], np.nan).dropna()
        meta = {"kind": "gpt2", "params": n_params, "target_params": target, "match_model": p.get("match_model"),
                "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd, "vocab_size": vocab,
                "bos_id": bos, "row_len": row_len, "style": style, "data": where + ".u16", "step": state.step,
                "val_nll": val_nll, "val_ppl": math.exp(val_nll) if val_tokens else float("nan"),
                "val_tokens": val_tokens, "steps_per_s": float(rates.median()) if len(rates) else float("nan"),
                "wall_time_s": state.wall_before + time.monotonic() - t_start, **provenance(saved_config)}
        write_json(out_dir / AR_META, meta)
        log(f"done: {state.step} steps, validation NLL {val_nll:.4f} nats/token (EMA), "
            f"{meta['steps_per_s']:.3g} steps/s -> {out_dir}")
        return meta
    finally:
        shutdown(dist)


# ---------------------------------------------------------------------------------------------------
# Sampling and decoding


def generate_rows(model, bos: int, row_len: int, num_samples: int, micro_batch: int, seed: int,
                  temperature: float = 1.0) -> tuple[np.ndarray, dict]:
    """``num_samples`` ancestral samples [N, row_len] (BOS dropped) and {network_calls, wall_time_s}."""
    import torch
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    gen_cfg = GenerationConfig(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0,
                               max_new_tokens=int(row_len), min_new_tokens=int(row_len),
                               eos_token_id=None, pad_token_id=int(bos), bos_token_id=int(bos))
    out, calls, t0 = [], 0, time.monotonic()
    for start in range(0, num_samples, micro_batch):
        b = min(micro_batch, num_samples - start)
        torch.manual_seed(derive_seed(seed, "noise", start))
        prompt = torch.full((b, 1), int(bos), dtype=torch.long, device=device)
        with torch.no_grad():
            ids = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                 generation_config=gen_cfg)
        out.append(ids[:, 1:].cpu().numpy())
        calls += int(row_len)  # one forward pass per new token (KV cache)
    return np.concatenate(out).astype(np.int64), {"network_calls": calls, "wall_time_s": time.monotonic() - t0}


def decode_rows(decoder, rows: np.ndarray):
    """Generated rows -> ``DecodedBatch`` through the run's decoder (see the module docstring)."""
    from bitstream.decode import DecodedBatch

    rows = np.asarray(rows, dtype=np.int64)
    if decoder.style == "lm1b":
        return decoder.decode_model_ids(rows)
    vocab = len(decoder.tokenizer)
    invalid = (rows < 0) | (rows >= vocab)
    unk = decoder.tokenizer.unk_token_id
    clean = np.where(invalid, unk if unk is not None else 0, rows)
    eos = decoder.inverse_codec.eos_id
    base = []
    for row in clean.tolist():  # exactly one framing EOS each side, like the inverse codec (spec §1.5)
        if row and row[0] == eos:
            row = row[1:]
        if row and row[-1] == eos:
            row = row[:-1]
        base.append(row)
    texts = decoder.tokenizer.batch_decode(base, skip_special_tokens=False,
                                           clean_up_tokenization_spaces=decoder.clean_up_tokenization_spaces)
    return DecodedBatch(texts=list(texts), model_ids=rows.tolist(), base_ids=base,
                        n_invalid=invalid.sum(axis=1).astype(int).tolist())


def load_ar(model_dir: Path, device="cpu"):
    from transformers import GPT2LMHeadModel

    meta = read_json(Path(model_dir) / AR_META)
    model = GPT2LMHeadModel.from_pretrained(str(Path(model_dir) / "model"))
    model.to(device).eval()
    return model, meta


def sample_stage(run_dir, model_dir, params: dict, seed: int, out, run: str, model_name: str,
                 device: str | None = None) -> "object":
    import pandas as pd
    import torch

    from bitstream.decode import TextDecoder

    p = fill_defaults(params)
    s = p["sampling"]
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    decoder = TextDecoder.from_run_dir(run_dir)  # fail before sampling when a tokenizer is missing
    model, meta = load_ar(Path(model_dir), device)
    rows, stats = generate_rows(model, int(meta["bos_id"]), int(meta["row_len"]), int(s["num_samples"]),
                                int(s["micro_batch"]), seed, float(s["temperature"]))
    batch = decode_rows(decoder, rows)
    wall = stats["wall_time_s"]
    df = pd.DataFrame({
        "run": run, "model": model_name, "spec": SPEC, "seed": int(seed),
        "sample_index": np.arange(len(rows), dtype=np.int64),
        "model_ids": [list(map(int, r)) for r in batch.model_ids],
        "base_ids": [list(map(int, r)) for r in batch.base_ids],
        "text": list(batch.texts), "n_invalid": np.asarray(batch.n_invalid, dtype=np.int64),
    })
    cols = {"sampler": SAMPLER, "method": "ancestral", "grid": "none", "nfe": int(meta["row_len"]),
            "network_calls": stats["network_calls"], "gamma": float("nan"), "temperature": float(s["temperature"]),
            "num_samples": int(s["num_samples"]), "micro_batch": int(s["micro_batch"]), "wall_time_s": wall,
            "samples_per_s": len(rows) / wall if wall > 0 else float("nan"), "device": str(device),
            "precision": "fp32", "torch_version": torch.__version__, "checkpoint": str(model_dir),
            "checkpoint_step": int(meta.get("step", -1)), "ar_params": int(meta["params"]),
            **provenance(s)}
    for k, v in cols.items():
        df[k] = v
    write_parquet(out, df)
    return df


# ---------------------------------------------------------------------------------------------------
# CLI


@stage_main("ar_reference")
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bitstream.ar_reference", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train the AR reference on the run's cache")
    tr.add_argument("--run-dir", required=True)
    tr.add_argument("--params", required=True, help="ar_models.<name> plus style/bits/seq_len/match (JSON)")
    tr.add_argument("--out-dir", required=True)
    tr.add_argument("--device", default=None)
    tr.add_argument("--stop-after", type=int, default=None, help="save checkpoints/last.pt and leave after N steps")
    tr.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: the params' cpus)")
    sp = sub.add_parser("sample", help="ancestral samples -> a sample parquet")
    sp.add_argument("--run-dir", required=True)
    sp.add_argument("--model-dir", required=True)
    sp.add_argument("--params", required=True)
    sp.add_argument("--seed", type=int, required=True)
    sp.add_argument("--run", required=True)
    sp.add_argument("--model", required=True)
    sp.add_argument("--out", required=True)
    sp.add_argument("--device", default=None)
    sp.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        params = parse_json_arg(args.params)
        if args.cmd == "train":
            meta = train_ar(args.run_dir, params, args.out_dir, device=args.device, stop_after=args.stop_after,
                            threads=args.threads or None)
            if meta.get("stopped"):
                return
            print(f"[ar] {meta['params']:,} parameters (target {meta.get('target_params')}); "
                  f"validation NLL {meta['val_nll']:.4f}", file=sys.stderr)
        else:
            if args.seed < 0:
                raise ValueError(f"--seed must be >= 0, got {args.seed}")
            setup_torch(args.threads)
            df = sample_stage(args.run_dir, args.model_dir, params, args.seed, args.out, args.run, args.model,
                              device=args.device)
            print(f"[ar] wrote {args.out}: {len(df)} samples", file=sys.stderr)
    except (ValueError, FileNotFoundError, KeyError) as err:
        raise SystemExit(f"ar_reference: {err}")


if __name__ == "__main__":
    main()
