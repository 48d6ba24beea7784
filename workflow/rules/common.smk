# Helpers shared by every rule file: config cross-checks, target lists, command-line arguments
# and cluster resources. Rules stay thin; anything with logic lives here.
import json
import os
import shlex
import sys

PY = shlex.quote(sys.executable)
RESULTS = "results"
RUNS = config["runs"]
SEEDS = config["seeds"]


def _check_references():
    """Fail fast, naming the key, when a run refers to a model, spec or judge that is not defined."""
    problems = []
    for run, rc in RUNS.items():
        for m in rc["models"]:
            if m not in config["models"]:
                problems.append(f"runs.{run}.models: '{m}' is not defined under models: ({', '.join(config['models'])})")
            elif config["models"][m]["architecture"].get("representation") == "tokens":
                problems.append(f"runs.{run}.models: '{m}' is the token-space baseline (architecture.representation: tokens), "
                                f"which the bit samplers cannot sample; train it alone (results/{run}/models/{m}/checkpoints/final.pt) "
                                f"or measure it with `snakemake efficiency`")
        for s in rc["specs"]:
            if s not in config["sampler_specs"]:
                problems.append(f"runs.{run}.specs: '{s}' is not defined under sampler_specs: ({', '.join(config['sampler_specs'])})")
        if rc["judge"] not in config["judges"]:
            problems.append(f"runs.{run}.judge: '{rc['judge']}' is not defined under judges: ({', '.join(config['judges'])})")
        problems += _check_run_inputs(run, rc)
        # Data jobs declare threads = data_resources.cpus; their worker processes must fit in it.
        cpus = rc["data_resources"]["cpus"]
        for section in ("corpus", "tokenizer", "code_tokenizer"):
            workers = (rc.get(section) or {}).get("workers", 1)
            if workers > cpus:
                problems.append(f"runs.{run}.{section}.workers: {workers} worker processes, but "
                                f"runs.{run}.data_resources.cpus is {cpus} (a data job uses at most its cpus)")
    if problems:
        raise ValueError("config: " + "; ".join(problems))


def _check_run_inputs(run, rc):
    """What a job would only find out after its predecessors ran: a bit width too narrow for the
    configured vocabulary (a trained tokenizer reaches at most tokenizer.vocab_size ids; a pretrained
    one is checked by the token cache) and corpus files that do not exist."""
    problems, bits = [], rc["bits"]
    tok, code = rc["tokenizer"], rc.get("code_tokenizer", {})
    if rc["style"] == "lm1b" and tok["kind"] != "pretrained" and tok["vocab_size"] > 2**bits:
        problems.append(f"runs.{run}.bits = {bits}: tokenizer.vocab_size {tok['vocab_size']} does not fit "
                        f"(2**{bits} = {2**bits}); expected bits >= {(tok['vocab_size'] - 1).bit_length()}")
    if rc["style"] == "owt" and not code.get("path") and code.get("vocab_size", 65536) > 2**bits:
        problems.append(f"runs.{run}.bits = {bits}: code_tokenizer.vocab_size {code.get('vocab_size', 65536)} "
                        f"does not fit (2**{bits} = {2**bits}); expected bits >= "
                        f"{(code.get('vocab_size', 65536) - 1).bit_length()}")
    for f in corpus_text_files(run):
        if not os.path.isfile(f):
            problems.append(f"runs.{run}.corpus.source: {f} is not a file (expected text:<file>[,<file>...])")
    return problems


def corpus_text_files(run):
    """The local files a run's corpus reads: text:<files> and a local hf_path (declared inputs, so
    editing them reruns the corpus and everything after it)."""
    corpus = RUNS[run]["corpus"]
    files = []
    if corpus["source"].startswith("text:"):
        files = [p.strip() for p in corpus["source"].split(":", 1)[1].split(",") if p.strip()]
    if corpus.get("hf_path") and os.path.exists(corpus["hf_path"]):
        files.append(corpus["hf_path"])
    return files


_check_references()


def _names_regex(names):
    import re

    return "|".join(re.escape(n) for n in names) or "(?!x)x"


def model_source(model):
    """``train`` (the train job) or ``import`` (the import_model job reads released weights)."""
    return config["models"][model].get("source", "train")


TRAINED_MODELS = _names_regex(m for m in config["models"] if model_source(m) == "train")
IMPORTED_MODELS = _names_regex(m for m in config["models"] if model_source(m) == "import")
LM1B_RUNS = _names_regex(r for r, rc in RUNS.items() if rc["style"] == "lm1b")
OWT_RUNS = _names_regex(r for r, rc in RUNS.items() if rc["style"] == "owt")
SPLIT_NAMES = ("train", "validation", "test")
SPLITS = "|".join(SPLIT_NAMES)


wildcard_constraints:
    run=_names_regex(RUNS),
    seed="\\d+",


def arg(obj):
    """A config section as one shell-quoted JSON argument (rules pass config to stages this way)."""
    return shlex.quote(json.dumps(obj, sort_keys=True))


def run_dir(run):
    return f"{RESULTS}/{run}"


def is_owt(run):
    return RUNS[run]["style"] == "owt"


# ---- config sections each stage receives (only what it uses, so that editing e.g. a sampler spec
# ---- does not re-run the data stages: Snakemake re-runs a job when its params change)
def corpus_params(run):
    rc = RUNS[run]
    return {"style": rc["style"], "corpus": rc["corpus"]}


def tokenizer_params(run):
    # No bits: they are checked at validation (_check_run_inputs) and by the token cache, so changing
    # them neither reruns the tokenizer nor deletes it when they do not fit.
    rc = RUNS[run]
    return {"style": rc["style"], "tokenizer": rc["tokenizer"]}


def cache_params(run):
    rc = RUNS[run]
    p = {"style": rc["style"], "seq_len": rc["seq_len"], "bits": rc["bits"], "workers": rc["tokenizer"]["workers"]}
    if rc["style"] == "owt":
        p["base_seq_len"] = rc["base_seq_len"]
    return p


def code_params(run):
    rc = RUNS[run]
    return {"code_tokenizer": rc["code_tokenizer"], "bits": rc["bits"], "seq_len": rc["seq_len"],
            "workers": rc["tokenizer"]["workers"]}


def _without(section, *keys):
    return {k: v for k, v in section.items() if k not in keys}


# Cluster settings (walltime, partition, ...) and published numbers do not change what a job
# computes, so they stay out of params: editing them must not re-run training or sampling.
def model_params(model):
    m = config["models"][model]
    res = m["resources"]
    # source/import select the job (train or import_model), they are not training parameters
    return {**_without(m, "resources", "source", "import"), "resources": {"gpus": res["gpus"], "cpus": res["cpus"]}}


def spec_params(spec):
    return _without(config["sampler_specs"][spec], "resources", "paper")


def judge_params(run):
    return _without(config["judges"][RUNS[run]["judge"]], "resources")


def eval_params(run):
    return _without(RUNS[run]["evaluation"], "resources", "paper_real")


# ---- cluster resources: every value comes from the config, so one rule runs on a laptop, a test
# ---- cluster and a GPU cluster. Unset values (None) are dropped by Snakemake.
def resources_from(get):
    """Resources of a rule, from the config's ``resources`` block that ``get(wildcards)`` returns.

    What the SLURM executor plugin (snakemake-executor-plugin-slurm 2.8) makes of each key:
      mem_mb -> ``--mem``, runtime (minutes) -> ``-t``, cpus_per_task -> ``--cpus-per-task`` (sbatch
      and the job's ``srun``), gpu -> ``--gpus=N`` (``--gpus=MODEL:N`` with gpu_model; srun gets
      ``--gpus=N`` too), slurm_partition -> ``-p``, slurm_account -> ``-A``, slurm_extra -> appended
      to the sbatch line as written (several flags are fine; the plugin refuses flags it manages).
    Tasks: a CPU job gets ``--ntasks=1`` from ``tasks``. A GPU job would get ``--ntasks-per-gpu``
    from ``tasks`` (so gpus=4 would mean 4 tasks); ``tasks_per_gpu=0`` suppresses that flag, the
    job keeps SLURM's default of one task holding all N GPUs, and torchrun (see ``launcher``)
    starts the per-GPU workers itself.
    gpu_model is only passed with gpus > 0: the plugin turns a lone gpu_model into ``--gpus=MODEL:1``.
    slurm_partition / slurm_account / slurm_extra are left out of a rule altogether when no config
    block the rule can see sets them, so that ``--default-resources slurm_partition=...`` (CLI or
    a profile) applies: a rule's own resource, even one that evaluates to None, would mask it.
    """

    def pick(key, transform=lambda v: v):
        def f(wc):
            v = get(wc).get(key)
            return None if v is None else transform(v)

        return f

    def gpus(wc):
        return get(wc).get("gpus") or 0

    res = {
        "mem_mb": pick("mem_mb"),
        "runtime": pick("runtime"),
        "cpus_per_task": pick("cpus"),
        "gpu": lambda wc: gpus(wc) or None,
        "gpu_model": lambda wc: get(wc).get("gpu_model") if gpus(wc) else None,
        "tasks": 1,
        "tasks_per_gpu": 0,
    }
    # Every block this rule can see: ``get`` at each (run, model, spec); None if ``get`` wants more.
    from types import SimpleNamespace

    try:
        blocks = [
            get(SimpleNamespace(run=run, model=model, spec=spec))
            for run in RUNS
            for model in config["models"]
            for spec in config["sampler_specs"] or [None]
        ]
    except (AttributeError, KeyError, TypeError):
        blocks = None
    for key in ("slurm_partition", "slurm_account", "slurm_extra"):
        if blocks is None or any(b.get(key) is not None for b in blocks):
            res[key] = pick(key, str)
    return res


# Scheduling order among ready jobs (Snakemake `priority:`; higher first). Trainings are the long jobs
# that everything else waits on, so they start first rather than one of them alone on a core at the end
# (seen once in config/ablations.yaml: 6 minutes with one of two cores idle; the total did not change,
# 41 min 37 s before and 42 min 0 s after, as trainings side by side run slower). The short data stages
# feed them and go first of all; judges after trainings (a judge at the trainings' priority took both
# cores before the token caches were built and delayed both trainings by 90 s in the embedded default).
DATA_PRIORITY = 30
TRAINING_PRIORITY = 20
JUDGE_PRIORITY = 10


def threads_from(get):
    """A rule's ``threads:``: the ``cpus`` of the config block ``get(wildcards)`` returns.

    ``snakemake --cores N`` then never runs more than N compute threads at once (it caps a job's
    threads at N), and the job passes the same ``{threads}`` to the stage's ``--threads`` (torch
    intra-op threads, :mod:`bitstream.cpu`). On SLURM the same number is ``--cpus-per-task``
    (``cpus_per_task`` in ``resources_from``).
    """
    return lambda wc: int(get(wc).get("cpus") or 1)


def launcher(res):
    """How to start a training process: torchrun across the job's GPUs, plain python otherwise.

    One SLURM task holds all N GPUs (``tasks_per_gpu=0`` in ``resources_from``); ``--standalone``
    runs the rendezvous on the node itself, so no MASTER_ADDR/PORT set-up is needed.
    """
    gpus = res.get("gpus") or 0
    if gpus > 1:
        return f"{PY} -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node {gpus}"
    return PY


# ---- targets
def model_dir(run, model):
    return f"{RESULTS}/{run}/models/{model}"


def model_input_caches(run):
    """The caches a model trains and is evaluated on: packed blocks (LM1B) or code rows (OWT)."""
    return [f"{RESULTS}/{run}/cache/{s}.u16" for s in SPLIT_NAMES]


def data_outputs():
    out = []
    for run in RUNS:
        out += model_input_caches(run)
        out.append(f"{RESULTS}/{run}/metrics/data_stats.parquet")
    return out


def sample_outputs(run):
    rc = RUNS[run]
    return [
        f"{RESULTS}/{run}/samples/{m}/{s}/seed{seed}.parquet"
        for m in rc["models"]
        for s in rc["specs"]
        for seed in SEEDS
    ]


def metric_outputs(run):
    return [p.replace("/samples/", "/metrics/") for p in sample_outputs(run)]


def vlb_outputs(run):
    if not RUNS[run]["evaluation"]["vlb"]:
        return []
    return [f"{RESULTS}/{run}/metrics/{m}/vlb.parquet" for m in RUNS[run]["models"]]


def summary_inputs(run):
    return metric_outputs(run) + ar_metric_outputs(run) + vlb_outputs(run) + [f"{RESULTS}/{run}/metrics/real.parquet"]


def paper_numbers():
    """Published numbers from the config (paper configs only) for Table 1's side columns."""
    out = {}
    for run, rc in RUNS.items():
        specs = {s: config["sampler_specs"][s]["paper"] for s in rc["specs"] if "paper" in config["sampler_specs"][s]}
        real = rc["evaluation"].get("paper_real")
        if specs or real:
            out[run] = {"specs": specs, "real": real}
    return out


def model_outputs():
    """Every training output. They are targets of `all` as well as inputs of their consumers: Snakemake
    does not rebuild a missing *intermediate* file while the files made from it exist, so a deleted
    entropy table or final.pt would otherwise go unnoticed (issue 13)."""
    common = ["checkpoints/final.pt", *(f"entropy/entropy_{t}.pt" for t in ENTROPY_TABLES)]
    # a trained model also writes its log; an imported one (import_model) its provenance record
    own = {"train": ["train_log.parquet"], "import": ["import.json"]}
    return [f"{model_dir(r, m)}/{f}" for r, rc in RUNS.items() for m in rc["models"]
            for f in common + own[model_source(m)]]


def all_outputs():
    out = data_outputs() + model_outputs()
    out += [f"{RESULTS}/{run}/summary.parquet" for run in RUNS]
    out += TABLES + FIGURES
    out += ablation_outputs()
    return out


TABLES = [f"{RESULTS}/tables/table1.{ext}" for ext in ("md", "csv", "tex")]
FIGURE_CAPTIONS = {
    "genppl_entropy_frontier": "frontier.rst",
    "entropy_rate_profile": "entropy_profile.rst",
    "training_curves": "training_curves.rst",
    "samples_per_second": "speed.rst",
}
FIGURES = [f"{RESULTS}/figures/{name}.png" for name in FIGURE_CAPTIONS]
