# Evaluation (spec §9): the judge, per-seed metrics, the real-data reference, the VLB and the
# per-run summary (mean ± std over seeds).


def eval_resources(wc):
    return RUNS[wc.run]["evaluation"]["resources"]


def judge_resources(wc):
    return config["judges"][RUNS[wc.run]["judge"]]["resources"]


rule judge:
    """Embedded default: a small GPT-2 trained on the run's corpus; paper configs: gpt2-large."""
    input:
        train=f"{RESULTS}/{{run}}/corpus/train.jsonl",
        validation=f"{RESULTS}/{{run}}/corpus/validation.jsonl",
        tokenizer=rules.tokenizer.output,
    output:
        f"{RESULTS}/{{run}}/judge/judge_meta.json",
    params:
        cfg=lambda wc: arg(judge_params(wc.run)),
        corpus_dir=lambda wc: f"{RESULTS}/{wc.run}/corpus",
        tok_dir=lambda wc: f"{RESULTS}/{wc.run}/tokenizer/base",
        out_dir=lambda wc: f"{RESULTS}/{wc.run}/judge",
        name=lambda wc: RUNS[wc.run]["judge"],
    log:
        f"{RESULTS}/{{run}}/logs/judge.log",
    priority: JUDGE_PRIORITY
    threads: threads_from(judge_resources)
    resources:
        **resources_from(judge_resources),
    shell:
        "exec {PY} -m bitstream.judge --corpus-dir {params.corpus_dir} --tokenizer-dir {params.tok_dir}"
        " --params {params.cfg} --name {params.name} --out-dir {params.out_dir} --threads {threads} > {log} 2>&1"


def mauve_inputs(wc):
    """MAUVE compares with held-out text, which needs the decoder and the test cache."""
    if not RUNS[wc.run]["evaluation"]["mauve"]:
        return []
    return decoder_inputs(wc) + [f"{RESULTS}/{wc.run}/cache/test.u16"]


rule metrics:
    input:
        samples=rules.sample.output,
        judge=rules.judge.output,
        mauve=mauve_inputs,
    output:
        f"{RESULTS}/{{run}}/metrics/{{model}}/{{spec}}/seed{{seed}}.parquet",
    params:
        cfg=lambda wc: arg(eval_params(wc.run)),
        judge_dir=lambda wc: f"{RESULTS}/{wc.run}/judge",
        run_dir=lambda wc: run_dir(wc.run),
    log:
        f"{RESULTS}/{{run}}/logs/metrics/{{model}}/{{spec}}/seed{{seed}}.log",
    threads: threads_from(eval_resources)
    resources:
        **resources_from(eval_resources),
    shell:
        "exec {PY} -m bitstream.metrics --samples {input.samples} --judge-dir {params.judge_dir}"
        " --run-dir {params.run_dir} --params {params.cfg} --out {output} --threads {threads} > {log} 2>&1"


rule real_reference:
    """GenPPL and entropy of held-out text under the same judge (Table 1's real-data row)."""
    input:
        test=f"{RESULTS}/{{run}}/cache/test.u16",
        decoder=decoder_inputs,
        judge=rules.judge.output,
    output:
        f"{RESULTS}/{{run}}/metrics/real.parquet",
    params:
        cfg=lambda wc: arg(eval_params(wc.run)),
        run_dir=lambda wc: run_dir(wc.run),
        judge_dir=lambda wc: f"{RESULTS}/{wc.run}/judge",
    log:
        f"{RESULTS}/{{run}}/logs/real_reference.log",
    threads: threads_from(eval_resources)
    resources:
        **resources_from(eval_resources),
    shell:
        "exec {PY} -m bitstream.metrics --real --run-dir {params.run_dir} --judge-dir {params.judge_dir}"
        " --params {params.cfg} --out {output} --threads {threads} > {log} 2>&1"


rule vlb:
    """Variational bound in bits per bit on the test split (spec §9.5)."""
    input:
        checkpoint=rules.train.output.checkpoint,
        test=f"{RESULTS}/{{run}}/cache/test.u16",
    output:
        f"{RESULTS}/{{run}}/metrics/{{model}}/vlb.parquet",
    params:
        cfg=lambda wc: arg(eval_params(wc.run)),
        cache_dir=lambda wc: f"{RESULTS}/{wc.run}/cache",
    log:
        f"{RESULTS}/{{run}}/logs/vlb_{{model}}.log",
    threads: threads_from(eval_resources)
    resources:
        **resources_from(eval_resources),
    shell:
        "exec {PY} -m bitstream.vlb --checkpoint {input.checkpoint} --cache-dir {params.cache_dir}"
        " --params {params.cfg} --out {output} --threads {threads} > {log} 2>&1"


rule summary:
    input:
        lambda wc: summary_inputs(wc.run),
    output:
        f"{RESULTS}/{{run}}/summary.parquet",
    params:
        run_dir=lambda wc: run_dir(wc.run),
    log:
        f"{RESULTS}/{{run}}/logs/summary.log",
    threads: 1
    localrule: True
    shell:
        "exec {PY} -m bitstream.summary --run-dir {params.run_dir} --inputs {input} --out {output} > {log} 2>&1"
