"""The ablation figures (spec §12, issue 10), drawn from per-seed metric files alone.

* ``frontier_<run>.png`` — left: GenPPL against unigram entropy over the churn γ for every model
  variant (one line per (model, NFE) of the entropic DDIM sampler with the full entropy band), the
  deterministic points (γ = 0) marked by open squares, the AR reference and the real data marked;
  right: MAUVE against entropy for the same points (the distributional check: GenPPL alone rewards
  repetitive, low-entropy text). Error bars: std over seeds.
* ``nfe_<run>.png`` — GenPPL against NFE for the deterministic samplers of the base model, one line
  per σ grid (entropic vs Karras; spec §12 "Karras vs entropic σ-grid").

``--params`` is the config's ``ablations`` block (``base_model`` is used).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bitstream.ablations import AR_SAMPLER, REAL, read_metrics  # noqa: E402
from bitstream.io import atomic_path, parse_json_arg, stage_main  # noqa: E402

plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.grid": True, "grid.alpha": 0.3,
                     "figure.dpi": 110})


def per_spec(metrics: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds per (run, model, spec), with the spec's settings."""
    rows = []
    for (run, model, spec), g in metrics.groupby(["run", "model", "spec"], sort=True):
        row = {"run": run, "model": model, "spec": spec, "n_seeds": len(g)}
        for m in ("gen_ppl", "entropy", "mauve"):
            v = g[m].astype(float).to_numpy() if m in g.columns else np.array([np.nan])
            row[f"{m}_mean"] = float(v.mean())
            row[f"{m}_std"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
        for s in ("sampler", "nfe", "gamma", "window", "q_lo", "q_hi", "grid"):
            row[s] = g[s].iloc[0] if s in g.columns else None
        rows.append(row)
    return pd.DataFrame(rows)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _is_full_band_entropic(s: pd.DataFrame) -> pd.Series:
    window = s["window"].astype(str)
    full = (window == "full") | ((window == "entropy_cdf") & (s["q_lo"].astype(float) <= 0)
                                 & (s["q_hi"].astype(float) >= 1))
    return (s["sampler"].astype(str) == "ddim_entropic") & full


def plot_frontier(s: pd.DataFrame, run: str, base_model: str, path: Path) -> None:
    fig, (ax, ax_m) = plt.subplots(1, 2, figsize=(11.5, 4.6))
    for a, metric, label in ((ax, "gen_ppl", "GenPPL under the judge (lower is better)"),
                             (ax_m, "mauve", "MAUVE vs the test split (higher is better)")):
        a.set_xlabel("unigram entropy of samples (nats)")
        a.set_ylabel(label)
        diff = s[(s["model"] != REAL) & (s["sampler"].astype(str) != AR_SAMPLER)]
        curves = diff[_is_full_band_entropic(diff)] if len(diff) else diff
        models = sorted(curves["model"].unique(), key=lambda m: (m != base_model, m))
        for k, model in enumerate(models):
            for nfe, g in curves[curves["model"] == model].groupby("nfe"):
                g = g.sort_values("gamma")
                line = a.errorbar(g["entropy_mean"], g[f"{metric}_mean"], xerr=g["entropy_std"],
                                  yerr=g[f"{metric}_std"], marker="o", ms=4, capsize=2, lw=1.4 if k == 0 else 1.0,
                                  label=f"{model}, NFE {int(nfe)}" + (" (base)" if model == base_model else ""))
                det = g[g["gamma"].astype(float) <= 0]
                a.plot(det["entropy_mean"], det[f"{metric}_mean"], "s", ms=9, mfc="none", color=line[0].get_color())
                if model == base_model and metric == "gen_ppl":
                    for _, r in g.iterrows():
                        a.annotate(f"γ={float(r['gamma']):.2f}", (r["entropy_mean"], r[f"{metric}_mean"]),
                                   textcoords="offset points", xytext=(4, 4), fontsize=7)
        ar = s[s["sampler"].astype(str) == AR_SAMPLER]
        for _, r in ar.iterrows():
            a.errorbar([r["entropy_mean"]], [r[f"{metric}_mean"]], xerr=[r["entropy_std"]],
                       yerr=[r[f"{metric}_std"]], fmt="D", ms=8, color="k", mfc="gold", capsize=2,
                       label=f"AR reference ({r['model']})")
        real = s[s["model"] == REAL]
        if len(real) and metric == "gen_ppl":
            r = real.iloc[0]
            a.plot([r["entropy_mean"]], [r["gen_ppl_mean"]], "*", ms=14, color="k", label="real data (test)")
            a.axvline(r["entropy_mean"], color="k", ls=":", lw=0.8)
        elif len(real):
            a.axvline(real.iloc[0]["entropy_mean"], color="k", ls=":", lw=0.8, label="real-data entropy")
        if metric == "mauve" and not np.isfinite(s["mauve_mean"].astype(float)).any():
            a.text(0.5, 0.5, "no MAUVE in the metric files\n(evaluation.mauve: false or mauve-text missing)",
                   ha="center", va="center", transform=a.transAxes, color="0.4")
        a.margins(0.1)
    ax.legend(fontsize=7, title="open square: deterministic (γ=0)", title_fontsize=7)
    fig.suptitle(f"{run}: GenPPL–entropy frontier over γ, entropic DDIM, full band (error bars: std over seeds)")
    _save(fig, path)


def plot_nfe(s: pd.DataFrame, run: str, base_model: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    det = s[(s["model"] == base_model) & (s["gamma"].astype(float).fillna(0) <= 0)
            & (s["sampler"].astype(str) != AR_SAMPLER)]
    nfes = set()
    for sampler, g in det.groupby("sampler"):
        g = g.sort_values("nfe")
        ax.errorbar(g["nfe"], g["gen_ppl_mean"], yerr=g["gen_ppl_std"], marker="o", capsize=3,
                    label=f"{sampler} ({'entropic' if 'entropic' in sampler else 'Karras'} grid)")
        nfes.update(int(n) for n in g["nfe"])
    real = s[s["model"] == REAL]
    if len(real):
        ax.axhline(real.iloc[0]["gen_ppl_mean"], color="k", ls=":", lw=0.8, label="real data (test)")
    if nfes:
        from matplotlib.ticker import NullFormatter, ScalarFormatter

        ax.set_xscale("log")
        ax.set_xticks(sorted(nfes))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, f"no deterministic specs of {base_model}", ha="center", va="center",
                transform=ax.transAxes, color="0.4")
    ax.set_xlabel("NFE (network calls per sample)")
    ax.set_ylabel("GenPPL under the judge (lower is better)")
    ax.set_title(f"{run} / {base_model}: deterministic sampler, σ grid vs NFE")
    _save(fig, path)


def build_figures(metric_files, cfg: dict, out_dir) -> list[Path]:
    if "base_model" not in cfg:
        raise ValueError("--params: the ablations block needs 'base_model'")
    specs = per_spec(read_metrics(metric_files))
    out_dir = Path(out_dir)
    paths = []
    for run in dict.fromkeys(specs["run"]):
        s = specs[specs["run"] == run]
        paths += [out_dir / f"frontier_{run}.png", out_dir / f"nfe_{run}.png"]
        plot_frontier(s, run, cfg["base_model"], paths[-2])
        plot_nfe(s, run, cfg["base_model"], paths[-1])
    return paths


@stage_main("ablation_figures")
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bitstream.ablation_figures", description=__doc__.split("\n")[0])
    ap.add_argument("--metrics", nargs="+", required=True, help="per-seed metric parquet files (and real.parquet)")
    ap.add_argument("--params", required=True, help="the config's ablations block (JSON or @file)")
    ap.add_argument("--out-dir", required=True, help="results/figures")
    args = ap.parse_args(argv)
    try:
        paths = build_figures(args.metrics, parse_json_arg(args.params, "--params"), args.out_dir)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"ablation_figures: {err}")
    for p in paths:
        print(f"[ablation_figures] wrote {p}", file=sys.stderr)


if __name__ == "__main__":
    main()
