"""The workflow on a real SLURM cluster through the repository's profile (`slurm/config.yaml`).

The cluster tests (marker ``slurm``) bring up a single-node SLURM with one fake GPU
(``scripts/slurm_local.sh``, needs root on Debian with apt reachable; skipped with the reason
otherwise), run ``snakemake --profile slurm`` on a tiny config in a temporary directory, check that
the GPU job went through sbatch with a GPU request and one task, rerun one seed, and stop every
daemon they started (a module finalizer, also on failure). Every subprocess has a timeout.

``test_submit_lines_of_the_paper_configs`` needs no cluster: it feeds the resources Snakemake
computes for the paper configs to the SLURM plugin's own sbatch/srun builders.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import REPO, job_counts as _job_counts

SCRIPT = REPO / "scripts" / "slurm_local.sh"
PROFILE = REPO / "slurm"
RUN, MODEL, SPEC = "lm1b_micro", "sdt_micro", "det_nfe4"
SEEDS = [0, 1]
PIPELINE_TIMEOUT = 240  # s, the tiny pipeline (about 17 SLURM jobs) end to end
RERUN_TIMEOUT = 90      # s, one sampling job


def tiny_slurm_config() -> dict:
    """LM1B-style run on a slice of the shipped corpus; a 1-block model trained on 'gpus: 1'."""
    small = {"cpus": 1, "mem_mb": 1000, "runtime": 10}
    return {
        "seeds": SEEDS,
        "sampler_specs": {SPEC: {"sampler": "ddim_entropic", "nfe": 4, "num_samples": 4, "micro_batch": 4,
                                 "resources": small}},
        "models": {MODEL: {
            "architecture": {"embed_dim": 32, "n_blocks": 1, "n_heads": 2, "dim_ff": 64, "content_dim": 8,
                             "head_hidden": 16, "dropout": 0.0},
            "training": {"steps": 20, "batch_size": 8, "lr": 1.0e-3, "warmup_steps": 5, "ema_decay": 0.9,
                         "checkpoint_every": 10, "keep_every": 0, "log_every": 5, "val_every": 10,
                         "val_batches": 1,
                         "entropy": {"buffer_size": 2000, "num_bins": 8, "min_per_bin": 2, "update_every": 10,
                                     "warmup_steps": 10, "transition_steps": 5}},
            # The fake GPU of the test cluster: the job must be submitted with --gpus=1. The code
            # itself runs on the CPU (no CUDA here).
            "resources": {"gpus": 1, **small}}},
        "judges": {"judge_micro": {"kind": "train", "n_layer": 1, "n_embd": 32, "n_head": 2, "context": 64,
                                   "steps": 10, "batch_size": 4, "resources": small}},
        "runs": {RUN: {
            "style": "lm1b",
            "corpus": {"source": "builtin:web", "max_documents": 300},
            "tokenizer": {"kind": "wordpiece", "vocab_size": 600},
            "seq_len": 32,
            "bits": 10,
            "models": [MODEL],
            "specs": [SPEC],
            "judge": "judge_micro",
            "evaluation": {"real_samples": 4, "mauve": False, "vlb": True, "vlb_batches": 1,
                           "vlb_batch_size": 4, "resources": small},
            "data_resources": small}},
    }


# ---------------------------------------------------------------------------------------------
# The cluster (module scope) and one run of the pipeline on it.


def _why_no_cluster() -> str | None:
    if os.geteuid() != 0:
        return "needs root to install and start SLURM (munged, slurmctld, slurmd)"
    if not Path("/etc/debian_version").exists() or shutil.which("apt-get") is None:
        return "needs Debian with apt-get to install slurm-wlm"
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        return "needs bash and coreutils timeout"
    return None


@pytest.fixture(scope="module")
def slurm_cluster(request):
    reason = _why_no_cluster()
    if reason:
        pytest.skip(reason)
    state = Path(tempfile.mkdtemp(prefix="bslurm.", dir="/tmp"))  # short: slurmd puts sockets here

    def stop():  # registered before `up`, so a half bring-up is undone too
        subprocess.run(["timeout", "-k", "5", "120", "bash", str(SCRIPT), "down", str(state)],
                       capture_output=True, text=True, timeout=140)
        shutil.rmtree(state, ignore_errors=True)

    request.addfinalizer(stop)
    # apt-get gets 120 s per call (install, update, install): a bring-up ends within the 420 s.
    env = dict(os.environ, SLURM_LOCAL_APT_TIMEOUT="120", SLURM_LOCAL_GPUS="1")
    proc = subprocess.run(["timeout", "-k", "5", "420", "bash", str(SCRIPT), "up", str(state)],
                          capture_output=True, text=True, timeout=440, env=env)
    if proc.returncode in (2, 3, 4):  # not root/Debian, apt unreachable, another SLURM in the way
        pytest.skip("no local SLURM cluster: " + (proc.stderr.strip().splitlines() or ["?"])[-1])
    assert proc.returncode == 0, f"slurm_local.sh up failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return state


def _snakemake(workdir: Path, *args: str, timeout: int) -> subprocess.CompletedProcess:
    """``snakemake --profile <repo>/slurm`` run from ``workdir`` (results land there, not in the repo).

    Command-line flags override the profile's cluster-scale values: 2 s before the first status
    query (the profile's 40 s would make every wave wait), no retries, keep the SLURM logs, and
    --verbose so that the plugin logs each sbatch call.
    """
    cmd = ["timeout", "-k", "10", str(timeout), sys.executable, "-m", "snakemake",
           "--snakefile", str(REPO / "Snakefile"), "--profile", str(PROFILE), "--configfile", "tiny.yaml",
           "--slurm-init-seconds-before-status-checks", "2", "--latency-wait", "5", "--retries", "0",
           "--slurm-keep-successful-logs", "--verbose", *args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout + 30)


def _explain(proc: subprocess.CompletedProcess, workdir: Path) -> str:
    logs = sorted((workdir / "results" / RUN / "logs").rglob("*.log"))
    tails = "".join(f"\n--- {p.relative_to(workdir)}\n{p.read_text()[-800:]}" for p in logs[-4:])
    failed = re.findall(r"Error in rule (\w+)", proc.stdout + proc.stderr)
    return (f"snakemake returned {proc.returncode} (124/137: timeout); failed rules: {failed}\n"
            f"{(proc.stdout + proc.stderr)[-4000:]}{tails}")


@pytest.fixture(scope="module")
def pipeline(slurm_cluster, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("slurm_e2e")
    (workdir / "tiny.yaml").write_text(yaml.safe_dump(tiny_slurm_config(), sort_keys=False))
    proc = _snakemake(workdir, "all", timeout=PIPELINE_TIMEOUT)
    return SimpleNamespace(workdir=workdir, proc=proc, log=proc.stdout + proc.stderr)


SBATCH_CALL = re.compile(r"^sbatch call: (sbatch .*?) --wrap=", re.M)
RULE_OF_CALL = re.compile(r"--comment rule_(.+?)(?:_wildcards_\S*)?\s")
SUBMITTED = re.compile(r"has been submitted with SLURM jobid (\d+) \(log: (\S+)/rule_(\w+)/")


def _sbatch_calls(log: str) -> list[tuple[str, str]]:
    """(rule, sbatch line) for every submission in a --verbose snakemake log."""
    return [(RULE_OF_CALL.search(c).group(1), c) for c in SBATCH_CALL.findall(log)]


# ---------------------------------------------------------------------------------------------


@pytest.mark.slurm
def test_pipeline_runs_through_slurm(pipeline):
    assert pipeline.proc.returncode == 0, _explain(pipeline.proc, pipeline.workdir)
    res = pipeline.workdir / "results"
    expected = [res / RUN / "summary.parquet", res / "tables" / "table1.md",
                res / RUN / "models" / MODEL / "checkpoints" / "final.pt"]
    expected += [res / RUN / kind / MODEL / SPEC / f"seed{s}.parquet" for kind in ("samples", "metrics")
                 for s in SEEDS]
    missing = [str(p.relative_to(pipeline.workdir)) for p in expected if not p.exists()]
    assert not missing, f"outputs missing after a green run: {missing}"
    assert not (REPO / "results" / RUN).exists(), "the run wrote into the repository's results/"
    # Every non-local job went through sbatch; the local ones (summary, tables, figures) did not.
    rules = {rule for rule, _ in _sbatch_calls(pipeline.log)}
    assert {"corpus", "tokenizer", "token_cache", "train", "sample", "judge", "metrics"} <= rules, rules
    assert not rules & {"summary", "tables", "figures", "all"}, rules


@pytest.mark.slurm
def test_gpu_job_is_one_task_holding_the_gpu(pipeline):
    assert pipeline.proc.returncode == 0, _explain(pipeline.proc, pipeline.workdir)
    calls = _sbatch_calls(pipeline.log)
    train = [line for rule, line in calls if rule == "train"]
    assert len(train) == 1, train
    line = train[0]
    assert "--gpus=1" in line and "--cpus-per-task=1" in line and "--mem 1000" in line and "-t 10" in line, line
    # One task holding the GPU(s): no --ntasks-per-gpu (gpus=N would mean N copies of the job).
    assert "--ntasks" not in line, line
    for rule, other in calls:
        if rule != "train":
            assert "--gpus" not in other and "--ntasks=1" in other, (rule, other)
    # What SLURM made of it, and how the job step ran inside the allocation.
    jobid, logdir = next((j, d) for j, d, rule in SUBMITTED.findall(pipeline.log) if rule == "train")
    show = subprocess.run(["timeout", "20", "scontrol", "show", "job", jobid],
                          capture_output=True, text=True, timeout=30).stdout
    assert "TresPerJob=gres:gpu:1" in show or "TresPerJob=gres/gpu:1" in show, show
    assert "NumTasks=1 " in show, show
    step_log = "".join(p.read_text() for p in Path(logdir, "rule_train").rglob(f"{jobid}.log"))
    assert re.search(r"srun -n1 .*--gpus=1", step_log), step_log[-3000:]


@pytest.mark.slurm
def test_one_seed_rerun_is_one_job(pipeline):
    assert pipeline.proc.returncode == 0, _explain(pipeline.proc, pipeline.workdir)
    target = f"results/{RUN}/samples/{MODEL}/{SPEC}/seed1.parquet"
    (pipeline.workdir / target).unlink()
    proc = _snakemake(pipeline.workdir, target, timeout=RERUN_TIMEOUT)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, _explain(proc, pipeline.workdir)
    assert _job_counts(log) == {"sample": 1}, _job_counts(log)
    assert [rule for rule, _ in _sbatch_calls(log)] == ["sample"]
    assert (pipeline.workdir / target).exists()


# ---------------------------------------------------------------------------------------------
# Without a cluster: the sbatch / srun lines the plugin builds for the paper configs.


class _Resources(dict):
    """What the plugin reads: ``job.resources.get(key)`` and ``job.resources.key``."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError as err:
            raise AttributeError(key) from err


def _dry_run_jobs(tmp_path: Path, *args: str) -> dict[str, list[tuple[dict, str]]]:
    """rule -> [(resources, shell command)] from ``snakemake --profile slurm -n -p``."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--profile", str(PROFILE),
           "--directory", str(tmp_path), "-n", "-p", *args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs: dict[str, list] = {}
    for block in re.split(r"\n(?=rule \w+:|localrule \w+:)", proc.stdout):
        head = re.match(r"(?:local)?rule (\w+):", block)
        res = re.search(r"^\s+resources: (.*)$", block, re.M)
        if not head or not res:
            continue
        resources = _Resources()
        for item in res.group(1).split(", "):
            key, _, value = item.partition("=")
            resources[key] = int(value) if value.lstrip("-").isdigit() else value
        shell = re.search(r"^Shell command: (.*)$", block, re.M)
        jobs.setdefault(head.group(1), []).append((resources, shell.group(1) if shell else ""))
    return jobs


def _submit_line(resources: _Resources, workdir: Path) -> tuple[str, str]:
    """The plugin's sbatch line (without partition/account/--wrap) and the job step's srun flags."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string
    from snakemake_executor_plugin_slurm_jobstep import get_cpu_setting, get_gpu_setting

    job = SimpleNamespace(resources=resources, threads=1, name="job")
    params = {"run_uuid": "uuid", "slurm_logfile": "slurm.log", "comment_str": "rule_job", "account": "",
              "partition": "", "workdir": str(workdir)}
    sbatch = get_submit_command(job, params) + set_gres_string(job)
    srun = f"srun -n1 {get_cpu_setting(job, bool(resources.get('gpu')))} {get_gpu_setting(job)}"
    return sbatch, srun


def test_submit_lines_of_the_paper_configs(tmp_path):
    """gpus: N -> one task holding N GPUs (torchrun starts the workers); partition/account from the
    command line reach rules whose config leaves them unset; gpu_model only on GPU jobs."""
    overlay = tmp_path / "site.yaml"  # a user's cluster settings, merged over the paper config
    overlay.write_text(yaml.safe_dump({
        "models": {"cobit_m_owt": {"resources": {"gpu_model": "h100"}}},
        "runs": {"owt": {"data_resources": {"gpu_model": "h100", "slurm_partition": "cpu"}}}}))
    jobs = _dry_run_jobs(tmp_path, "all", "--configfile", str(REPO / "config/paper/owt_cobit_m.yaml"),
                         str(overlay), "--default-resources", "slurm_partition=gpu", "slurm_account=proj")

    (train, shell), = jobs["train"]
    sbatch, srun = _submit_line(train, tmp_path)
    assert "--gpus=h100:8" in sbatch and "--cpus-per-task=64" in sbatch, sbatch
    assert "--mem 512000" in sbatch and "-t 1440" in sbatch, sbatch
    assert "--ntasks" not in sbatch, sbatch  # no --ntasks-per-gpu: one task, not 8 copies
    assert "--gpus=8" in srun, srun
    assert "--nproc_per_node 8" in shell and "torch.distributed.run --standalone" in shell, shell
    assert train["slurm_partition"] == "gpu" and train["slurm_account"] == "proj", train  # CLI defaults

    (corpus, _), = jobs["corpus"]
    sbatch, srun = _submit_line(corpus, tmp_path)
    assert "--gpus" not in sbatch and "--ntasks=1" in sbatch, sbatch  # gpu_model alone asks for nothing
    assert "--gpus" not in srun, srun
    assert corpus["slurm_partition"] == "cpu", corpus  # the config's value wins where it is set

    sample, _ = jobs["sample"][0]
    sbatch, _ = _submit_line(sample, tmp_path)
    assert "--gpus=1" in sbatch and "--ntasks" not in sbatch, sbatch
    assert len(jobs["sample"]) == 40 and len(jobs["metrics"]) == 40  # 4 cells x 10 seeds
