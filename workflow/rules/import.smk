# Released weights instead of training (models with `source: import`): the import_model job writes
# what training writes -- checkpoints/final.pt (EMA weights, our format), the four entropy tables --
# plus import.json (provenance), so sampling, metrics, summary, tables and figures are unchanged.
# A local rule: hub downloads need the network, which login nodes have and compute nodes often lack;
# the job is I/O plus one CPU load of the weights (no GPU).


def import_params(model):
    """What the import computes from: the source and the architecture (no training or cluster keys)."""
    m = config["models"][model]
    return {"source": m["source"], "import": m["import"], "architecture": m["architecture"]}


rule import_model:
    output:
        checkpoint=f"{RESULTS}/{{run}}/models/{{model}}/checkpoints/final.pt",
        entropy=[f"{RESULTS}/{{run}}/models/{{model}}/entropy/entropy_{t}.pt" for t in ENTROPY_TABLES],
        provenance=f"{RESULTS}/{{run}}/models/{{model}}/import.json",
    wildcard_constraints:
        model=IMPORTED_MODELS,
    params:
        cfg=lambda wc: arg(import_params(wc.model)),
        out_dir=lambda wc: model_dir(wc.run, wc.model),
        bits=lambda wc: RUNS[wc.run]["bits"],
        seq_len=lambda wc: RUNS[wc.run]["seq_len"],
    log:
        f"{RESULTS}/{{run}}/logs/import_{{model}}.log",
    localrule: True
    shell:
        "{PY} -m bitstream.import_model --params {params.cfg} --bits {params.bits} --seq-len {params.seq_len}"
        " --out-dir {params.out_dir} --run {wildcards.run} --model {wildcards.model} > {log} 2>&1"
