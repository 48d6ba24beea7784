"""Estimate the wall time of an ablation config (default config/ablations.yaml) on 2 cores, from measured
CPU seconds of short runs of each job kind.

    .venv/bin/python benchmarks/bench_ablations.py --run-dir /tmp/smoke/results/lm1b_abl

``--run-dir`` is a run directory of the same run shape (corpus, tokenizer, caches, a judge and an
``abl_base``-shaped checkpoint), e.g. from a reduced smoke run of the config. Every job is started as
the workflow starts it (``python -m bitstream.<stage>``) and its CPU time (user + system, children
included) is read from ``os.wait4`` — CPU time, unlike wall time, hardly depends on how loaded a
shared machine is. Measured:

* training: each model variant at ``--steps`` steps, the base model also at ``--steps-short`` (the
  difference gives CPU per step, the rest is start-up), extrapolated to the config's ``training.steps``;
  the AR reference likewise;
* the judge at two step counts, extrapolated to the config's judge steps;
* one sampling job per distinct (sampler, NFE, samples) of the run's specs, the AR sampling job;
* one metrics job (GenPPL + MAUVE as configured) and the real-data job.

The estimate is total CPU / cores (jobs are single-threaded and independent) — a lower bound that is
close when there are many more jobs than cores, as here — plus nothing for Snakemake's own overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def cpu_of(cmd: list[str], env=None) -> float:
    """CPU seconds (user + sys) of a command and its children."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed:\n{err[-3000:]}")
    return usage.ru_utime + usage.ru_stime


def model_params(cfg, name, steps):
    m = json.loads(json.dumps(cfg["models"][name]))
    m["training"].update(steps=steps, checkpoint_every=steps, val_every=steps, log_every=max(1, steps // 4))
    m["training"]["entropy"]["update_every"] = max(1, steps // 2)
    m.setdefault("resources", {})["cpus"] = 1
    return m


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "config" / "ablations.yaml"))
    ap.add_argument("--run", default=None, help="run name (default: the config's first run)")
    ap.add_argument("--run-dir", required=True, help="results/{run} with caches, judge and models/abl_base")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--steps-short", type=int, default=10)
    ap.add_argument("--cores", type=int, default=2)
    args = ap.parse_args(argv)
    cfg = yaml.safe_load(Path(args.config).read_text())
    run = args.run or next(iter(cfg["runs"]))
    rc = cfg["runs"][run]
    run_dir = Path(args.run_dir)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    seeds = len(cfg["seeds"])
    rows = []  # (what, jobs, cpu per job)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # training
        base = rc["models"][0]

        def train_cpu(name, steps):
            return cpu_of([PY, "-m", "bitstream.train", "--cache-dir", str(run_dir / "cache"), "--bits", str(rc["bits"]),
                           "--seq-len", str(rc["seq_len"]), "--params", json.dumps(model_params(cfg, name, steps)),
                           "--out-dir", str(tmp / f"{name}_{steps}")], env)

        short, long_ = train_cpu(base, args.steps_short), train_cpu(base, args.steps)
        per_step = (long_ - short) / (args.steps - args.steps_short)
        startup = short - per_step * args.steps_short
        for name in rc["models"]:
            c = long_ if name == base else train_cpu(name, args.steps)
            ratio = (c - startup) / (long_ - startup)
            steps = int(cfg["models"][name]["training"]["steps"])
            rows.append((f"train {name} ({ratio:.2f}x base per step)", 1, startup + ratio * per_step * steps))
        # AR reference
        for ar_name in rc.get("ar_models", []):
            ac = json.loads(json.dumps(cfg["ar_models"][ar_name]))
            params = {k: v for k, v in ac.items() if k not in ("resources", "sampling")}
            params.update(style=rc["style"], bits=rc["bits"], seq_len=rc["seq_len"], resources={"cpus": 1})
            params["match_architecture"] = cfg["models"][ac["match_model"]]["architecture"]

            def ar_cpu(steps):
                p = json.loads(json.dumps(params))
                p["training"].update(steps=steps, checkpoint_every=steps, val_every=steps, log_every=max(1, steps // 4))
                out = tmp / f"ar_{steps}"
                return cpu_of([PY, "-m", "bitstream.ar_reference", "train", "--run-dir", str(run_dir),
                               "--params", json.dumps(p), "--out-dir", str(out)], env), out

            (a_s, _), (a_l, ar_dir) = ar_cpu(args.steps_short), ar_cpu(args.steps)
            a_per = (a_l - a_s) / (args.steps - args.steps_short)
            rows.append((f"train AR {ar_name}", 1, a_s - a_per * args.steps_short + a_per * int(ac["training"]["steps"])))
            c = cpu_of([PY, "-m", "bitstream.ar_reference", "sample", "--run-dir", str(run_dir), "--model-dir", str(ar_dir),
                        "--params", json.dumps(ac["sampling"]), "--seed", "0", "--run", run, "--model", ar_name,
                        "--out", str(tmp / "ar_samples.parquet")], env)
            rows.append((f"sample AR {ar_name}", seeds, c))
        # judge
        judge = cfg["judges"][rc["judge"]]

        def judge_cpu(steps):
            p = {**judge, "steps": steps}
            return cpu_of([PY, "-m", "bitstream.judge", "--corpus-dir", str(run_dir / "corpus"), "--tokenizer-dir",
                           str(run_dir / "tokenizer" / "base"), "--params", json.dumps(p), "--out-dir",
                           str(tmp / f"judge_{steps}")], env)

        j_s, j_l = judge_cpu(args.steps_short), judge_cpu(args.steps)
        j_per = (j_l - j_s) / (args.steps - args.steps_short)
        rows.append(("judge", 1, j_s - j_per * args.steps_short + j_per * int(judge["steps"])))
        # sampling: one job per distinct cost class, counted for every (model, spec, seed)
        # the cost of sampling does not depend on the weights: any trained model of the run's shape will do
        ckpt = next((c for m in rc["models"] if (c := run_dir / "models" / m / "checkpoints" / "final.pt").exists()),
                    run_dir / "models" / base / "checkpoints" / "final.pt")
        classes: dict[tuple, list[str]] = {}
        for s in rc["specs"]:
            sp = cfg["sampler_specs"][s]
            classes.setdefault((sp["sampler"], sp["nfe"], sp.get("num_samples", 64)), []).append(s)
        sample_file = None
        for key, specs in classes.items():
            out = tmp / f"s_{key[0]}_{key[1]}.parquet"
            c = cpu_of([PY, "-m", "bitstream.sample", "--checkpoint", str(ckpt), "--entropy-dir",
                        str(ckpt.parent.parent / "entropy"), "--run-dir", str(run_dir), "--spec",
                        json.dumps({k: v for k, v in cfg["sampler_specs"][specs[0]].items() if k != "resources"}),
                        "--seed", "0", "--out", str(out), "--threads", "1"], env)
            rows.append((f"sample {key[0]} NFE {key[1]} x{key[2]} ({len(specs)} specs)",
                         len(specs) * len(rc["models"]) * seeds, c))
            sample_file = out
        ev = {k: v for k, v in rc.get("evaluation", {}).items() if k != "resources"}
        c = cpu_of([PY, "-m", "bitstream.metrics", "--samples", str(sample_file), "--judge-dir", str(tmp / f"judge_{args.steps}"),
                    "--run-dir", str(run_dir), "--params", json.dumps(ev), "--out", str(tmp / "m.parquet"),
                    "--device", "cpu"], env)
        n_metrics = (len(rc["specs"]) * len(rc["models"]) + len(rc.get("ar_models", []))) * seeds
        rows.append((f"metrics (GenPPL{' + MAUVE' if ev.get('mauve') else ''})", n_metrics, c))
    total = sum(n * c for _, n, c in rows)
    print(f"{'job':55s} {'jobs':>5s} {'CPU s/job':>10s} {'CPU s':>8s}")
    for what, n, c in rows:
        print(f"{what:55s} {n:5d} {c:10.1f} {n * c:8.0f}")
    print(f"{'total (data stages, VLB, summary, tables not included)':55s} {'':5s} {'':10s} {total:8.0f}")
    print(f"estimated wall time on {args.cores} cores: {total / args.cores / 60:.1f} min (+ data stages, VLB, reports)")


if __name__ == "__main__":
    main()
