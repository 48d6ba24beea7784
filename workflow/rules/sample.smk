# Sampling (spec §8): one job per (run, model, sampler spec, seed). The seed alone decides the
# samples, so deleting one seed's parquet and asking for it reruns exactly that job.


def decoder_inputs(wc):
    """What bits -> ids -> text needs: the base tokenizer, and the code tokenizer for OWT style."""
    out = [f"{RESULTS}/{wc.run}/tokenizer/base/meta.json"]
    if is_owt(wc.run):
        out.append(f"{RESULTS}/{wc.run}/tokenizer/code/tokenizer.json")
    return out


def spec_resources(wc):
    return config["sampler_specs"][wc.spec]["resources"]


rule sample:
    input:
        checkpoint=rules.train.output.checkpoint,
        entropy=rules.train.output.entropy,
        decoder=decoder_inputs,
    output:
        f"{RESULTS}/{{run}}/samples/{{model}}/{{spec}}/seed{{seed}}.parquet",
    params:
        spec=lambda wc: arg(spec_params(wc.spec)),
        run_dir=lambda wc: run_dir(wc.run),
        bits=lambda wc: RUNS[wc.run]["bits"],
        entropy_dir=lambda wc: f"{model_dir(wc.run, wc.model)}/entropy",
    log:
        f"{RESULTS}/{{run}}/logs/sample/{{model}}/{{spec}}/seed{{seed}}.log",
    threads: threads_from(spec_resources)
    resources:
        **resources_from(spec_resources),
    shell:
        "exec {PY} -m bitstream.sample --checkpoint {input.checkpoint} --entropy-dir {params.entropy_dir}"
        " --run-dir {params.run_dir} --bits {params.bits} --spec {params.spec} --seed {wildcards.seed}"
        " --run {wildcards.run} --model {wildcards.model} --spec-name {wildcards.spec}"
        " --threads {threads} --out {output} > {log} 2>&1"
