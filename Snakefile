# bitstream: CoBit (entropy-gated continuous bitstream diffusion) as a reproducible workflow.
#
#   snakemake --cores 2 all                      embedded default on a CPU
#   snakemake --profile slurm all --configfile config/paper/lm1b_cobit_s.yaml
#   snakemake --cores 2 figures tables           redraw from cached metric files only
#   snakemake --cores 2 efficiency               O(log V) vs O(V) benchmarks (spec §11), not part of all
#
# Stages: corpus -> tokenizer -> token cache -> train (or import_model) -> sample[spec, seed] -> metrics[spec, seed]
#         -> summary -> tables, figures   (judge and data_stats on the side). See README.md.
import yaml
from snakemake.utils import min_version, validate

min_version("9.0")


# The embedded default, unless the user names a config: --configfile replaces it rather than being
# merged into it (a merge would add the default's small runs to a paper config). A config without
# `runs:` (e.g. config/paper/efficiency.yaml, which only sets `efficiency:`) is an overlay on the default.
if not workflow.overwrite_configfiles or "runs" not in config:

    configfile: f"{workflow.basedir}/config/config.yaml"


# Snakemake reads --config values with YAML's BaseLoader, which keeps every nested value a string
# (`seeds=[0,1]` -> ['0', '1']); read them again with the safe loader so types survive validation,
# and merge nested mappings key by key: `models={sdt_tiny:{training:{steps:10}}}` changes one key and
# keeps every other key of sdt_tiny (replacing the section would let the schema's paper-size
# defaults fill the gaps silently).
def _merge(base, override):
    if not isinstance(base, dict) or not isinstance(override, dict):
        return override
    out = dict(base)
    for k, v in override.items():
        out[k] = _merge(base.get(k), v)
    return out


def _compact(obj):
    """YAML reads the shell-friendly `{steps:10}` (no space after the colon) as the key 'steps:10'
    with no value (Snakemake's own reading, already merged into config, gives it the value ''); read
    such a key as `steps: 10`."""
    if isinstance(obj, list):
        return [_compact(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    out = {}
    for k, v in obj.items():
        if v in (None, "") and isinstance(k, str) and ":" in k:
            k, _, text = k.partition(":")
            v = yaml.safe_load(text)
        out[k] = _compact(v)
    return out


for _entry in workflow.config_settings.config_args or []:
    _key, _, _value = _entry.partition("=")
    config[_key] = _compact(_merge(config.get(_key), _compact(yaml.safe_load(_value))))

validate(config, "workflow/schemas/config.schema.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/import.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/efficiency.smk"
include: "workflow/rules/ablations.smk"


localrules:
    all,
    data,
    figures,
    tables,
    efficiency,
    efficiency_report,


rule all:
    input:
        all_outputs(),
    default_target: True


rule data:
    input:
        data_outputs(),
