# Data stages (spec §1): corpus -> tokenizer -> token cache (-> code tokenizer -> code cache for
# OWT-style runs), and the real-data reference statistics.


def data_resources(wc):
    return RUNS[wc.run]["data_resources"]


rule corpus:
    input:
        lambda wc: corpus_text_files(wc.run),
    output:
        train=f"{RESULTS}/{{run}}/corpus/train.jsonl",
        validation=f"{RESULTS}/{{run}}/corpus/validation.jsonl",
        test=f"{RESULTS}/{{run}}/corpus/test.jsonl",
        meta=f"{RESULTS}/{{run}}/corpus/meta.json",
    params:
        cfg=lambda wc: arg(corpus_params(wc.run)),
        out_dir=lambda wc: f"{RESULTS}/{wc.run}/corpus",
    log:
        f"{RESULTS}/{{run}}/logs/corpus.log",
    priority: DATA_PRIORITY
    threads: threads_from(data_resources)
    resources:
        **resources_from(data_resources),
    shell:
        "exec {PY} -m bitstream.corpus --params {params.cfg} --out-dir {params.out_dir} > {log} 2>&1"


rule tokenizer:
    input:
        rules.corpus.output.train,
    output:
        f"{RESULTS}/{{run}}/tokenizer/base/meta.json",
    params:
        cfg=lambda wc: arg(tokenizer_params(wc.run)),
        corpus_dir=lambda wc: f"{RESULTS}/{wc.run}/corpus",
        out_dir=lambda wc: f"{RESULTS}/{wc.run}/tokenizer/base",
    log:
        f"{RESULTS}/{{run}}/logs/tokenizer.log",
    priority: DATA_PRIORITY
    threads: threads_from(data_resources)
    resources:
        **resources_from(data_resources),
    shell:
        "exec {PY} -m bitstream.tokenizer --corpus-dir {params.corpus_dir} --params {params.cfg}"
        " --out-dir {params.out_dir} > {log} 2>&1"


rule token_cache:
    """LM1B style: [SEP]-packed blocks of seq_len tokens, the model input (spec §1.1)."""
    input:
        corpus=f"{RESULTS}/{{run}}/corpus/{{split}}.jsonl",
        tokenizer=rules.tokenizer.output,
    output:
        u16=f"{RESULTS}/{{run}}/cache/{{split}}.u16",
        meta=f"{RESULTS}/{{run}}/cache/{{split}}.meta.json",
    wildcard_constraints:
        run=LM1B_RUNS,
        split=SPLITS,
    params:
        cfg=lambda wc: arg(cache_params(wc.run)),
        corpus_dir=lambda wc: f"{RESULTS}/{wc.run}/corpus",
        tok_dir=lambda wc: f"{RESULTS}/{wc.run}/tokenizer/base",
        prefix=lambda wc: f"{RESULTS}/{wc.run}/cache/{wc.split}",
    log:
        f"{RESULTS}/{{run}}/logs/token_cache_{{split}}.log",
    priority: DATA_PRIORITY
    threads: threads_from(data_resources)
    resources:
        **resources_from(data_resources),
    shell:
        "exec {PY} -m bitstream.token_cache --corpus-dir {params.corpus_dir} --tokenizer-dir {params.tok_dir}"
        " --split {wildcards.split} --params {params.cfg} --out {params.prefix} > {log} 2>&1"


use rule token_cache as base_cache with:
    output:
        u16=f"{RESULTS}/{{run}}/cache/{{split}}.base.u16",
        meta=f"{RESULTS}/{{run}}/cache/{{split}}.base.meta.json",
    wildcard_constraints:
        run=OWT_RUNS,
        split=SPLITS,
    log:
        f"{RESULTS}/{{run}}/logs/base_cache_{{split}}.log",


rule code_tokenizer:
    """Second-stage 'code' BPE over framed base sequences (spec §1.5), OWT-style runs only."""
    input:
        f"{RESULTS}/{{run}}/cache/train.base.u16",
    output:
        tokenizer=f"{RESULTS}/{{run}}/tokenizer/code/tokenizer.json",
        meta=f"{RESULTS}/{{run}}/tokenizer/code/meta.json",
    params:
        cfg=lambda wc: arg(code_params(wc.run)),
        base=lambda wc: f"{RESULTS}/{wc.run}/cache/train.base",
        out_dir=lambda wc: f"{RESULTS}/{wc.run}/tokenizer/code",
    log:
        f"{RESULTS}/{{run}}/logs/code_tokenizer.log",
    priority: DATA_PRIORITY
    threads: threads_from(data_resources)
    resources:
        **resources_from(data_resources),
    shell:
        "exec {PY} -m bitstream.codec train --base-cache {params.base} --params {params.cfg}"
        " --out-dir {params.out_dir} > {log} 2>&1"


rule code_cache:
    input:
        base=f"{RESULTS}/{{run}}/cache/{{split}}.base.u16",
        tokenizer=rules.code_tokenizer.output.tokenizer,
    output:
        u16=f"{RESULTS}/{{run}}/cache/{{split}}.u16",
        meta=f"{RESULTS}/{{run}}/cache/{{split}}.meta.json",
    wildcard_constraints:
        run=OWT_RUNS,
        split=SPLITS,
    params:
        cfg=lambda wc: arg(code_params(wc.run)),
        base=lambda wc: f"{RESULTS}/{wc.run}/cache/{wc.split}.base",
        code_dir=lambda wc: f"{RESULTS}/{wc.run}/tokenizer/code",
        prefix=lambda wc: f"{RESULTS}/{wc.run}/cache/{wc.split}",
    log:
        f"{RESULTS}/{{run}}/logs/code_cache_{{split}}.log",
    priority: DATA_PRIORITY
    threads: threads_from(data_resources)
    resources:
        **resources_from(data_resources),
    shell:
        "exec {PY} -m bitstream.codec encode --base-cache {params.base} --code-dir {params.code_dir}"
        " --params {params.cfg} --out {params.prefix} > {log} 2>&1"


rule data_stats:
    input:
        caches=lambda wc: model_input_caches(wc.run),
        tokenizer=rules.tokenizer.output,
    output:
        f"{RESULTS}/{{run}}/metrics/data_stats.parquet",
    params:
        cfg=lambda wc: arg({"style": RUNS[wc.run]["style"]}),
        run_dir=lambda wc: run_dir(wc.run),
    log:
        f"{RESULTS}/{{run}}/logs/data_stats.log",
    threads: threads_from(data_resources)
    resources:
        **resources_from(data_resources),
    shell:
        "exec {PY} -m bitstream.data_stats --run-dir {params.run_dir} --params {params.cfg}"
        " --out {output} > {log} 2>&1"
