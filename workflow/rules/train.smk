# Training (spec §2-§7, §13): one SDT per (run, model). Writes the EMA checkpoint, the four entropy
# tables and the training log. Resumes from checkpoints/last.pt (deliberately not a declared output,
# so Snakemake keeps it when a job fails or hits its walltime and the resubmitted job continues).

ENTROPY_TABLES = ("pdf", "cdf", "sigmas", "edges")


def model_resources(wc):
    return config["models"][wc.model]["resources"]


rule train:
    input:
        train=f"{RESULTS}/{{run}}/cache/train.u16",
        validation=f"{RESULTS}/{{run}}/cache/validation.u16",
    output:
        checkpoint=f"{RESULTS}/{{run}}/models/{{model}}/checkpoints/final.pt",
        entropy=[f"{RESULTS}/{{run}}/models/{{model}}/entropy/entropy_{t}.pt" for t in ENTROPY_TABLES],
        train_log=f"{RESULTS}/{{run}}/models/{{model}}/train_log.parquet",
    wildcard_constraints:
        model=TRAINED_MODELS,  # imported models come from rule import_model (import.smk) instead
    params:
        cfg=lambda wc: arg(model_params(wc.model)),
        launcher=lambda wc: launcher(model_resources(wc)),
        cache_dir=lambda wc: f"{RESULTS}/{wc.run}/cache",
        out_dir=lambda wc: model_dir(wc.run, wc.model),
        bits=lambda wc: RUNS[wc.run]["bits"],
        seq_len=lambda wc: RUNS[wc.run]["seq_len"],
    log:
        f"{RESULTS}/{{run}}/logs/train_{{model}}.log",
    priority: TRAINING_PRIORITY
    threads: threads_from(model_resources)
    resources:
        **resources_from(model_resources),
    # Snakemake clears {log} when it resubmits a job (walltime, retries); train_attempts.log beside the
    # checkpoints keeps the output of every attempt of a resumed run. `exec` makes the trainer the job's
    # process (a `| tee` pipeline left it running, writing final.pt, after its wrapper was killed).
    shell:
        "mkdir -p {params.out_dir}; exec > >(tee -a {params.out_dir}/train_attempts.log > {log}) 2>&1;"
        " exec {params.launcher} -m bitstream.train --cache-dir {params.cache_dir}"
        " --bits {params.bits} --seq-len {params.seq_len} --params {params.cfg} --out-dir {params.out_dir}"
        " --threads {threads}"
