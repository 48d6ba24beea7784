# Efficiency (spec §11): `snakemake efficiency` measures the O(log V) bit head against the O(V)
# token head and writes results/efficiency/*.parquet, results/tables/efficiency.{md,tex} and
# results/figures/efficiency_*.png. Settings and resources: the config's `efficiency:` section.
# The measurement rule does not depend on the module's code (a plotting edit must not re-measure);
# its settings are params, so changing them re-measures.

EFFICIENCY_DIR = f"{RESULTS}/efficiency"
EFFICIENCY_PARQUETS = [f"{EFFICIENCY_DIR}/{kind}.parquet" for kind in ("analytic", "boundary", "end_to_end", "inference")]
EFFICIENCY_TABLES = [f"{RESULTS}/tables/efficiency.{ext}" for ext in ("md", "tex")]
EFFICIENCY_FIGURES = [
    f"{RESULTS}/figures/efficiency_{name}.png" for name in ("head", "training", "inference")
]


def efficiency_resources(wc):
    return config["efficiency"]["resources"]


rule efficiency_benchmark:
    output:
        EFFICIENCY_PARQUETS,
    params:
        settings=arg(_without(config["efficiency"], "resources")),
        out_dir=EFFICIENCY_DIR,
    threads: config["efficiency"]["resources"]["cpus"]  # local scheduling; the command reads cpus_per_task
    log:
        f"{RESULTS}/logs/efficiency_benchmark.log",
    resources:
        **resources_from(efficiency_resources),
    shell:
        "{PY} -m bitstream.efficiency measure --params {params.settings} --threads {resources.cpus_per_task}"
        " --out-dir {params.out_dir} > {log} 2>&1"


rule efficiency_report:
    input:
        code=f"{workflow.basedir}/bitstream/efficiency.py",
        measurements=EFFICIENCY_PARQUETS,
    output:
        report(EFFICIENCY_TABLES[0], caption="../report/efficiency.rst", category="Efficiency"),
        EFFICIENCY_TABLES[1],
        [report(f, caption="../report/efficiency.rst", category="Efficiency") for f in EFFICIENCY_FIGURES],
    params:
        in_dir=EFFICIENCY_DIR,
        tables_dir=f"{RESULTS}/tables",
        figures_dir=f"{RESULTS}/figures",
    log:
        f"{RESULTS}/logs/efficiency_report.log",
    shell:
        "{PY} -m bitstream.efficiency report --in-dir {params.in_dir} --tables-dir {params.tables_dir}"
        " --figures-dir {params.figures_dir} > {log} 2>&1"


rule efficiency:
    input:
        EFFICIENCY_TABLES + EFFICIENCY_FIGURES,
