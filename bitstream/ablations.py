"""The ablation table (spec §12, issue 10): every (run, model, spec) against the base model.

Built from per-seed metric files alone (``results/{run}/metrics/{model}/{spec}/seed{S}.parquet`` with
their per-sample ``sample_nll`` / ``sample_tokens`` / ``sample_entropy`` columns, and
``metrics/real.parquet``) and written as ``ablations.{md,csv,tex}``. One row per (run, model, spec):
GenPPL, entropy and MAUVE as mean ± std over seeds, and the difference to the row's reference with a
bootstrap interval (``bitstream.bootstrap``). The reference of a row is

* a model variant (``logit_mode``, ``loss``, ``weighting``, ``entropy.enabled``, ...) -> the base model
  at the **same** spec: paired (common random numbers: same seed, same sample index, same noise);
* a spec of the base model -> ``spec_baselines[spec]`` if given (e.g. a Karras grid -> the entropic
  grid at equal NFE), else ``base_spec``: paired (same initial latents);
* the AR reference (sampler ``ar_ancestral``) -> the base model at ``base_spec``: *unpaired* (its
  samples share no noise with the diffusion model's);
* the base model at ``base_spec`` is the reference itself (no difference shown).

``--params`` is the config's ``ablations`` block: ``{"base_model", "base_spec", "spec_baselines",
"bootstrap_samples", "level"}``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from bitstream.bootstrap import SeedScores, bootstrap_difference
from bitstream.io import parse_json_arg, write_text, stage_main
from bitstream.summary import read_parquet_files
from bitstream.tables import markdown_grid

AR_SAMPLER = "ar_ancestral"  # bitstream.ar_reference.SAMPLER
REAL = "real"
PER_SAMPLE = ("sample_nll", "sample_tokens", "sample_entropy")
SETTINGS = ("sampler", "nfe", "gamma", "window", "q_lo", "q_hi", "grid")
CSV_COLUMNS = ["run", "role", "model", "spec", "sampler", "nfe", "gamma", "window", "n_seeds",
               "gen_ppl_mean", "gen_ppl_std", "entropy_mean", "entropy_std", "mauve_mean", "mauve_std",
               "reference", "paired", "d_gen_ppl", "d_gen_ppl_lo", "d_gen_ppl_hi",
               "d_entropy", "d_entropy_lo", "d_entropy_hi"]


def read_metrics(files) -> pd.DataFrame:
    if not files:
        raise ValueError("no metrics files given")
    return read_parquet_files(files, "metrics")


def seed_scores(rows: pd.DataFrame, where: str) -> dict[int, SeedScores]:
    """{seed: per-sample scores} of one (run, model, spec)."""
    missing = [c for c in PER_SAMPLE if c not in rows.columns]
    if missing:
        raise ValueError(f"{where}: metrics rows lack per-sample columns {missing} (rebuild them with the "
                         f"current bitstream.metrics)")
    out = {}
    for _, r in rows.iterrows():
        out[int(r["seed"])] = SeedScores(np.asarray(r["sample_nll"], dtype=float),
                                         np.asarray(r["sample_tokens"], dtype=float),
                                         np.asarray(r["sample_entropy"], dtype=float))
    return out


def _role(model: str, spec: str, sampler, cfg: dict) -> str:
    if sampler == AR_SAMPLER:
        return "AR reference"
    if model != cfg["base_model"]:
        return "model variant"
    return "base" if spec == cfg["base_spec"] else "sampler variant"


def _reference(model: str, spec: str, role: str, cfg: dict) -> tuple[str, str] | None:
    if role == "base":
        return None
    if role in ("AR reference",):
        return cfg["base_model"], cfg["base_spec"]
    if role == "model variant":
        return cfg["base_model"], spec
    return cfg["base_model"], (cfg.get("spec_baselines") or {}).get(spec, cfg["base_spec"])


def _mean_std(v) -> tuple[float, float]:
    v = np.asarray(v, dtype=float)
    return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else float("nan"))


def _setting(g: pd.DataFrame, col: str):
    if col not in g.columns:
        return None
    vals = g[col].dropna().unique().tolist()
    return vals[0] if len(vals) == 1 else (",".join(map(str, vals)) if vals else None)


def ablation_rows(metrics: pd.DataFrame, cfg: dict) -> pd.DataFrame:
    """The table's rows with raw numbers (CSV_COLUMNS)."""
    n_boot, level = int(cfg.get("bootstrap_samples", 2000)), float(cfg.get("level", 0.95))
    rows = []
    for run in dict.fromkeys(metrics["run"]):
        m = metrics[metrics["run"] == run]
        real = m[m["model"] == REAL]
        for _, r in real.iterrows():
            rows.append({"run": run, "role": "real data", "gen_ppl_mean": r["gen_ppl"], "entropy_mean": r["entropy"],
                         "n_seeds": None})
        groups = {k: g.sort_values("seed") for k, g in m[m["model"] != REAL].groupby(["model", "spec"], sort=False)}
        scores = {}

        def scores_of(key):
            if key not in scores:
                if key not in groups:
                    return None
                scores[key] = seed_scores(groups[key], f"{run}/{key[0]}/{key[1]}")
            return scores[key]

        order = {"base": 0, "model variant": 1, "sampler variant": 2, "AR reference": 3}
        keyed = []
        for (model, spec), g in groups.items():
            role = _role(model, spec, _setting(g, "sampler"), cfg)
            nfe, gamma = np.nan_to_num(_num(_setting(g, "nfe"))), np.nan_to_num(_num(_setting(g, "gamma")))
            keyed.append((order[role], model, str(_setting(g, "sampler")), nfe, gamma, spec, role, g))
        for *_, spec, role, g in sorted(keyed, key=lambda k: k[:6]):
            model = g["model"].iloc[0]
            row = {"run": run, "role": role, "model": model, "spec": spec, "n_seeds": len(g),
                   **{c: _setting(g, c) for c in ("sampler", "nfe", "gamma", "window")}}
            for metric in ("gen_ppl", "entropy", "mauve"):
                if metric in g.columns:
                    row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std(g[metric])
            ref = _reference(model, spec, role, cfg)
            if ref is not None:
                row["reference"] = f"{ref[0]} / {ref[1]}"
                mine, theirs = scores_of((model, spec)), scores_of(ref)
                if theirs is None:
                    row["reference"] += " (missing)"
                else:
                    common = sorted(set(mine) & set(theirs))
                    paired = role != "AR reference" and bool(common) and all(
                        len(mine[s].nll) == len(theirs[s].nll) for s in common)
                    v = [mine[s] for s in (common if paired else sorted(mine))]
                    b = [theirs[s] for s in (common if paired else sorted(theirs))]
                    row["paired"] = paired
                    for stat in ("gen_ppl", "entropy"):
                        iv = bootstrap_difference(v, b, stat, n_boot=n_boot, level=level, paired=paired, seed=0)
                        row[f"d_{stat}"], row[f"d_{stat}_lo"], row[f"d_{stat}_hi"] = iv.estimate, iv.lo, iv.hi
            rows.append(row)
    return pd.DataFrame(rows, columns=CSV_COLUMNS)


# ---------------------------------------------------------------------------------------------------
# formatting


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _pm(mean, std, digits=2, pm=" ± ") -> str:
    mean, std = _num(mean), _num(std)
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" + ("" if math.isnan(std) else f"{pm}{std:.{digits}f}")


def _diff(est, lo, hi, digits=2, pm="") -> str:
    est, lo, hi = _num(est), _num(lo), _num(hi)
    if math.isnan(est):
        return "–"
    sign = "*" if not (math.isnan(lo) or lo <= 0 <= hi) else ""
    return f"{est:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]{sign}"


def _text(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def _display(rows: pd.DataFrame, pm: str, gamma: str, delta: str):
    header = ["Run", "Role", "Model", "Spec", "NFE", gamma, "Seeds", "GenPPL", "Entropy", "MAUVE",
              "Compared with", f"{delta} GenPPL [95% CI]", f"{delta} entropy [95% CI]"]
    body = []
    for _, r in rows.iterrows():
        nfe = "–" if pd.isna(r["nfe"]) else str(int(r["nfe"]))
        g = "–" if pd.isna(_num(r["gamma"])) else f"{_num(r['gamma']):.3f}"
        ref = _text(r["reference"]) + ("" if pd.isna(r["paired"]) or r["paired"] else " (unpaired)")
        body.append([str(r["run"]), str(r["role"]), _text(r["model"]), _text(r["spec"]), nfe, g,
                     "–" if pd.isna(r["n_seeds"]) else str(int(r["n_seeds"])),
                     _pm(r["gen_ppl_mean"], r["gen_ppl_std"], pm=pm), _pm(r["entropy_mean"], r["entropy_std"], 3, pm),
                     _pm(r["mauve_mean"], r["mauve_std"], 3, pm), ref,
                     _diff(r["d_gen_ppl"], r["d_gen_ppl_lo"], r["d_gen_ppl_hi"]),
                     _diff(r["d_entropy"], r["d_entropy_lo"], r["d_entropy_hi"], 3)])
    return header, body


def to_markdown(rows: pd.DataFrame, level: float) -> str:
    header, body = _display(rows, " ± ", "γ", "Δ")
    out = ["# Ablations: components, samplers and the autoregressive reference", "",
           "GenPPL (judge), unigram entropy (nats) and MAUVE: mean ± sample std over seeds. Δ: this row minus "
           f"the row it is compared with, with a {level:.0%} bootstrap interval — paired over (seed, sample) "
           "for diffusion rows (common random numbers), unpaired for the AR reference; * = the interval "
           "excludes 0.", ""]
    return "\n".join(out + markdown_grid(header, body)) + "\n"


def _tex(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"),
                 ("–", "--"), ("*", r"$^*$")):
        s = s.replace(a, b)
    return s


def to_latex(rows: pd.DataFrame) -> str:
    header, body = _display(rows, r" $\pm$ ", r"$\gamma$", r"$\Delta$")
    header = [h if "$" in h else _tex(h) for h in header]
    out = [r"% Ablation table (bitstream.ablations); needs \usepackage{booktabs}",
           r"\begin{tabular}{" + "llll" + "r" * (len(header) - 4) + "}", r"\toprule",
           " & ".join(header) + r" \\", r"\midrule"]
    out += [" & ".join(c if "$" in c else _tex(c) for c in line) + r" \\" for line in body]
    out += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(out) + "\n"


def build_tables(metric_files, cfg: dict, out_dir) -> pd.DataFrame:
    for key in ("base_model", "base_spec"):
        if key not in cfg:
            raise ValueError(f"--params: the ablations block needs {key!r}")
    rows = ablation_rows(read_metrics(metric_files), cfg)
    out_dir = Path(out_dir)
    write_text(out_dir / "ablations.md", to_markdown(rows, float(cfg.get("level", 0.95))))
    write_text(out_dir / "ablations.tex", to_latex(rows))
    write_text(out_dir / "ablations.csv", rows.to_csv(index=False))
    return rows


@stage_main("ablations")
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bitstream.ablations", description=__doc__.split("\n")[0])
    ap.add_argument("--metrics", nargs="+", required=True, help="per-seed metric parquet files (and real.parquet)")
    ap.add_argument("--params", required=True, help="the config's ablations block (JSON or @file)")
    ap.add_argument("--out-dir", required=True, help="results/tables")
    args = ap.parse_args(argv)
    try:
        cfg = parse_json_arg(args.params, "--params")
        rows = build_tables(args.metrics, cfg, args.out_dir)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"ablations: {err}")
    print(to_markdown(rows, float(cfg.get("level", 0.95))), file=sys.stderr)


if __name__ == "__main__":
    main()
