# The paper's other claims (spec §12, issue 10): the autoregressive reference of each run, and the
# ablation table and figures built from cached metric files alone. Model and sampler ablations need no
# rule of their own: they are ordinary models and sampler specs of a run, fanned out by sample/metrics.
#
#   results/{run}/ar/{ar}/ar_meta.json                         ar_train   (GPT-2-style LM, transformers)
#   results/{run}/samples/{ar}/ancestral/seed{S}.parquet       ar_sample  (same format as `sample`)
#   results/{run}/metrics/{ar}/ancestral/seed{S}.parquet       metrics    (the same judge as every row)
#   results/tables/ablations.{md,csv,tex}, results/figures/{frontier,nfe}_{run}.png

AR_MODELS = config.get("ar_models") or {}
ABLATIONS = config.get("ablations")
AR_SPEC = "ancestral"  # bitstream.ar_reference.SPEC


def _check_ablation_references():
    problems = []
    for run, rc in RUNS.items():
        for a in rc.get("ar_models", []):
            if a not in AR_MODELS:
                problems.append(f"runs.{run}.ar_models: '{a}' is not defined under ar_models: ({', '.join(AR_MODELS) or 'none'})")
            elif a in config["models"]:
                problems.append(f"runs.{run}.ar_models: '{a}' is also a diffusion model name; use another name")
        if AR_SPEC in rc["specs"]:
            problems.append(f"runs.{run}.specs: '{AR_SPEC}' is reserved for the AR reference's samples")
    for name, ac in AR_MODELS.items():
        match = ac.get("match_model")
        if match is not None and match not in config["models"]:
            problems.append(f"ar_models.{name}.match_model: '{match}' is not defined under models: ({', '.join(config['models'])})")
    if ABLATIONS:
        for run, rc in RUNS.items():
            if ABLATIONS["base_model"] not in rc["models"]:
                problems.append(f"ablations.base_model: '{ABLATIONS['base_model']}' is not a model of run {run} ({', '.join(rc['models'])})")
            if ABLATIONS["base_spec"] not in rc["specs"]:
                problems.append(f"ablations.base_spec: '{ABLATIONS['base_spec']}' is not a spec of run {run} ({', '.join(rc['specs'])})")
            for s, ref in ABLATIONS.get("spec_baselines", {}).items():
                for k, v in (("key", s), ("value", ref)):
                    if v not in config["sampler_specs"]:
                        problems.append(f"ablations.spec_baselines: {k} '{v}' is not defined under sampler_specs:")
    if problems:
        raise ValueError("config: " + "; ".join(problems))


_check_ablation_references()


def ar_metric_outputs(run):
    return [
        f"{RESULTS}/{run}/metrics/{a}/{AR_SPEC}/seed{seed}.parquet"
        for a in RUNS[run].get("ar_models", [])
        for seed in SEEDS
    ]


def ablation_runs():
    return list(RUNS) if ABLATIONS else []


ABLATION_TABLES = [f"{RESULTS}/tables/ablations.{ext}" for ext in ("md", "csv", "tex")]


def ablation_figures():
    return [f"{RESULTS}/figures/{kind}_{run}.png" for run in ablation_runs() for kind in ("frontier", "nfe")]


def ablation_outputs():
    return (ABLATION_TABLES + ablation_figures()) if ABLATIONS else []


def ablation_metric_files():
    out = []
    for run in ablation_runs():
        out += metric_outputs(run) + ar_metric_outputs(run) + [f"{RESULTS}/{run}/metrics/real.parquet"]
    return out


def ar_dir(run, ar):
    return f"{RESULTS}/{run}/ar/{ar}"


def ar_params(wc):
    """What decides the AR model: its config, the run's data shape, and the size it must match."""
    ac = AR_MODELS[wc.model]
    rc = RUNS[wc.run]
    match = ac.get("match_model")
    p = {k: v for k, v in ac.items() if k not in ("resources", "sampling")}
    p["resources"] = {"cpus": ac["resources"]["cpus"], "gpus": ac["resources"]["gpus"]}  # threads / device
    p.update(style=rc["style"], bits=rc["bits"], seq_len=rc["seq_len"])
    if match is not None:
        p["match_architecture"] = config["models"][match].get("architecture", {})
    return p


def ar_inputs(wc):
    suffix = ".base" if is_owt(wc.run) else ""
    return [f"{RESULTS}/{wc.run}/cache/{s}{suffix}.u16" for s in ("train", "validation")]


def ar_resources(wc):
    return AR_MODELS[wc.model]["resources"]


rule ar_train:
    """GPT-2-style causal LM, parameter-matched to a diffusion model, on the run's tokens."""
    input:
        ar_inputs,
    output:
        meta=f"{RESULTS}/{{run}}/ar/{{model}}/ar_meta.json",
        train_log=f"{RESULTS}/{{run}}/ar/{{model}}/train_log.parquet",
    wildcard_constraints:
        model=_names_regex(AR_MODELS),
    params:
        cfg=lambda wc: arg(ar_params(wc)),
        run_dir=lambda wc: run_dir(wc.run),
        out_dir=lambda wc: ar_dir(wc.run, wc.model),
    log:
        f"{RESULTS}/{{run}}/logs/ar_train_{{model}}.log",
    priority: TRAINING_PRIORITY
    threads: threads_from(ar_resources)
    resources:
        **resources_from(ar_resources),
    shell:
        "exec {PY} -m bitstream.ar_reference train --run-dir {params.run_dir} --params {params.cfg}"
        " --out-dir {params.out_dir} --threads {threads} > {log} 2>&1"


rule ar_sample:
    """Ancestral samples at temperature 1, decoded by the run's decoder (format of `sample`)."""
    input:
        meta=rules.ar_train.output.meta,
        decoder=decoder_inputs,
    output:
        f"{RESULTS}/{{run}}/samples/{{model}}/{AR_SPEC}/seed{{seed}}.parquet",
    wildcard_constraints:
        model=_names_regex(AR_MODELS),
    params:
        cfg=lambda wc: arg(AR_MODELS[wc.model]["sampling"]),
        run_dir=lambda wc: run_dir(wc.run),
        model_dir=lambda wc: ar_dir(wc.run, wc.model),
    log:
        f"{RESULTS}/{{run}}/logs/sample/{{model}}/{AR_SPEC}/seed{{seed}}.log",
    threads: threads_from(ar_resources)
    resources:
        **resources_from(ar_resources),
    shell:
        "exec {PY} -m bitstream.ar_reference sample --run-dir {params.run_dir} --model-dir {params.model_dir}"
        " --params {params.cfg} --seed {wildcards.seed} --run {wildcards.run} --model {wildcards.model}"
        " --threads {threads} --out {output} > {log} 2>&1"


# An AR model's sample file also matches `sample`'s pattern; its constraints and this order settle it.
ruleorder: ar_sample > sample


rule ablation_tables:
    input:
        code=f"{workflow.basedir}/bitstream/ablations.py",
        metrics=ablation_metric_files(),
    output:
        ABLATION_TABLES,
    params:
        cfg=arg(ABLATIONS or {}),
        out_dir=f"{RESULTS}/tables",
    log:
        f"{RESULTS}/logs/ablation_tables.log",
    localrule: True
    shell:
        "{PY} -m bitstream.ablations --metrics {input.metrics} --params {params.cfg}"
        " --out-dir {params.out_dir} > {log} 2>&1"


rule ablation_figures:
    input:
        code=f"{workflow.basedir}/bitstream/ablation_figures.py",
        metrics=ablation_metric_files(),
    output:
        ablation_figures(),
    params:
        cfg=arg(ABLATIONS or {}),
        out_dir=f"{RESULTS}/figures",
    log:
        f"{RESULTS}/logs/ablation_figures.log",
    localrule: True
    shell:
        "{PY} -m bitstream.ablation_figures --metrics {input.metrics} --params {params.cfg}"
        " --out-dir {params.out_dir} > {log} 2>&1"
