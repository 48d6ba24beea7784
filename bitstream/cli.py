"""``bitstream <stage> [args]``: one entry point for every stage module (``python -m bitstream.<stage>``)."""

from __future__ import annotations

import importlib
import sys

STAGES = {
    "corpus": "source text -> cleaned train/validation/test splits (spec §1.1, §1.4)",
    "tokenizer": "train or load the base tokenizer",
    "token_cache": "token ids -> uint16 memmap rows + meta (spec §1.1, §1.4)",
    "codec": "second-stage code tokenizer: train / encode (spec §1.5)",
    "data_stats": "real-data unigram entropy per split (spec §9.3)",
    "model": "SDT sizes and parameter counts (spec §6)",
    "train": "train an SDT (spec §2-§7, §13)",
    "import_model": "import released CoBit weights (official format, local or hub:) instead of training",
    "sample": "sample from a checkpoint (spec §8)",
    "judge": "train or load the GenPPL judge (spec §9.2)",
    "metrics": "GenPPL, entropy, MAUVE for one sample file (spec §9)",
    "vlb": "variational bound in bits per bit (spec §9.5)",
    "summary": "mean ± std over seeds per spec",
    "tables": "Table 1 (md, csv, tex)",
    "figures": "the paper's figures (PNG)",
    "efficiency": "O(log V) bit head vs O(V) token head: memory and time (spec §11)",
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, STAGES))
        print("usage: bitstream <stage> [args]   (or: python -m bitstream.<stage> [args])\n\nstages:")
        for name, what in STAGES.items():
            print(f"  {name:<{width}}  {what}")
        return
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        raise SystemExit(f"bitstream: unknown stage {stage!r}; expected one of: {', '.join(STAGES)}")
    module = importlib.import_module(f"bitstream.{stage}")
    sys.argv = [f"bitstream {stage}", *rest]
    module.main(rest)


if __name__ == "__main__":
    main()
