# The paper's outputs, rebuilt from parquet files alone. The plotting/table modules are inputs, so
# editing them and rerunning redraws figures and tables without retraining or resampling.


def train_logs():
    """Only trained models have a training log (imported ones have import.json instead)."""
    return [f"{model_dir(r, m)}/train_log.parquet" for r, rc in RUNS.items() for m in rc["models"]
            if model_source(m) == "train"]


def entropy_tables():
    return [
        f"{model_dir(r, m)}/entropy/entropy_{t}.pt"
        for r, rc in RUNS.items()
        for m in rc["models"]
        for t in ENTROPY_TABLES
    ]


rule tables:
    input:
        code=f"{workflow.basedir}/bitstream/tables.py",
        summaries=[f"{RESULTS}/{run}/summary.parquet" for run in RUNS],
    output:
        report(TABLES[0], caption="../report/table1.rst", category="Tables"),
        TABLES[1],
        TABLES[2],
    params:
        paper=arg(paper_numbers()),
        out_dir=f"{RESULTS}/tables",
    log:
        f"{RESULTS}/logs/tables.log",
    threads: 1
    shell:
        "exec {PY} -m bitstream.tables --summaries {input.summaries} --paper {params.paper}"
        " --out-dir {params.out_dir} > {log} 2>&1"


rule figures:
    input:
        code=f"{workflow.basedir}/bitstream/figures.py",
        summaries=[f"{RESULTS}/{run}/summary.parquet" for run in RUNS],
        train_logs=train_logs(),
        entropy=entropy_tables(),
    output:
        [
            report(f, caption=f"../report/{caption}", category="Figures")
            for f, caption in zip(FIGURES, FIGURE_CAPTIONS.values())
        ],
    params:
        run_dirs=[run_dir(run) for run in RUNS],
        out_dir=f"{RESULTS}/figures",
    log:
        f"{RESULTS}/logs/figures.log",
    threads: 1
    shell:
        "exec {PY} -m bitstream.figures --run-dirs {params.run_dirs} --out-dir {params.out_dir} > {log} 2>&1"
