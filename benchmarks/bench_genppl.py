"""GenPPL scoring speed: upstream's one-text-at-a-time loop against length-sorted padded batches.

    .venv/bin/python benchmarks/bench_genppl.py                       # a random judge of the default size
    .venv/bin/python benchmarks/bench_genppl.py --shape gpt2-small    # GPT-2 small (124M) shape
    .venv/bin/python benchmarks/bench_genppl.py --judge-dir results/lm1b_web/judge --texts 256

Without ``--judge-dir`` a random GPT-2 is built in a temporary directory and loaded through
``bitstream.judge.load_judge``: ``--shape default`` is the embedded default judge (2 layers, 128 wide,
context 128, a 2,000-word word-level tokenizer), ``--shape gpt2-small`` has GPT-2 small's shape (12
layers, 768 wide, 12 heads, context 1024, a 50,257-word vocabulary). Texts are 1,024 random-word
texts of about the default samples' length (32 tokens, +-50 %). Prints texts/s for one-at-a-time
scoring (upstream) and for each ``--batch-size``, the speed-up and the relative GenPPL difference.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bitstream.cpu import setup_torch  # noqa: E402
from bitstream.io import write_json  # noqa: E402
from bitstream.judge import JUDGE_META, load_judge  # noqa: E402
from bitstream.metrics import gen_ppl  # noqa: E402


SHAPES = {"default": dict(vocab=2000, n_layer=2, n_embd=128, n_head=4, context=128),
          "gpt2-small": dict(vocab=50257, n_layer=12, n_embd=768, n_head=12, context=1024)}


def random_judge(path: Path, vocab: int, n_layer: int, n_embd: int, n_head: int, context: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = {"[UNK]": 0, "[SEP]": 1, "[PAD]": 2, **{f"w{i}": i + 3 for i in range(vocab - 3)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]",
                            pad_token="[PAD]").save_pretrained(path)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_positions=context, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                     bos_token_id=1, eos_token_id=1, pad_token_id=2)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    write_json(path / JUDGE_META, {"name": "random-gpt2", "kind": "train", "source": ".",
                                   "dtype": "float32", "context": context, "batch_size_score": 16})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--judge-dir", default=None)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="default", help="random judge's shape")
    ap.add_argument("--texts", type=int, default=1024)
    ap.add_argument("--words", type=int, default=32, help="mean words (= judge tokens) per text")
    ap.add_argument("--batch-size", type=int, action="append", help="windows per forward pass (repeatable; "
                                                                    "default: the judge's batch_size_score)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1, help="best of N timings")
    args = ap.parse_args()
    setup_torch(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        judge_dir = args.judge_dir
        if judge_dir is None:
            judge_dir = Path(tmp)
            random_judge(judge_dir, **SHAPES[args.shape])
        upstream = load_judge(judge_dir, device="cpu", fused_gelu=False)  # the model exactly as published
        scorer = load_judge(judge_dir, device="cpu")
        rng = np.random.default_rng(0)
        vocab_words = [f"w{i}" for i in range(1997)]
        texts = [" ".join(rng.choice(vocab_words, size=int(rng.integers(args.words // 2, args.words * 3 // 2))))
                 for _ in range(args.texts)]
        gen_ppl(texts[:4], scorer, batch_size=2)  # warm-up
        gen_ppl(texts[:4], upstream, batch_size=1)

        sizes = [1] + (args.batch_size or [scorer.batch_size])
        results = {}
        for bs in sizes:
            best = None
            for _ in range(args.repeats):
                res = gen_ppl(texts, upstream if bs == 1 else scorer, batch_size=bs)
                best = res if best is None or res.wall_time_s < best.wall_time_s else best
            results[bs] = best
            label = "one-at-a-time" if bs == 1 else f"batched ({bs})"
            print(f"{label:>16}: {best.texts_per_s:8.1f} texts/s  ({best.wall_time_s:.2f} s for {len(texts)} "
                  f"texts, {best.n_windows} windows, {best.n_scored_tokens} tokens)  GenPPL {best.ppl:.8f}",
                  flush=True)
        one = results[1]
        for bs in sizes[1:]:
            b = results[bs]
            print(f"batch {bs}: speed-up {b.texts_per_s / one.texts_per_s:.2f}x; |ΔGenPPL|/GenPPL = "
                  f"{abs(b.ppl - one.ppl) / one.ppl:.2e}")
        print(f"judge {scorer.name} ({args.shape if args.judge_dir is None else args.judge_dir}), context "
              f"{scorer.context}, {torch.get_num_threads()} thread(s), torch {torch.__version__}")


if __name__ == "__main__":
    main()
