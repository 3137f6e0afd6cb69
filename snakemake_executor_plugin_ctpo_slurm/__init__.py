"""`--executor ctpo-slurm`: snakemake-executor-plugin-slurm 2.8.0, except that a failed job whose rule exited 78
(ctpo.exitcodes.EXIT_PERMANENT: a bad config, a model or checkpoint not on disk, a failed preflight) is not
submitted again: a retry would fail the same way after queueing for its GPUs again.

Why a plugin: Snakemake 9.27.1 restarts every failed job while `retries` allows (scheduling/job_scheduler.py
`_handle_error`: `if job.restart_times > job.attempt - 1`, whatever the failure), and the SLURM plugin reports
every FAILED, TIMEOUT, CANCELLED or OUT_OF_MEMORY job the same way (`check_active_jobs` -> `report_job_error`);
neither looks at an exit code, and the code of the rule's command is lost through the two job-step Snakemake
processes (the SLURM job exits 1). What survives is the job step's log, which the plugin keeps for failed jobs:
Snakemake prints there that the command "returned non-zero exit status 78.". This subclass reads it when a job
fails, and when Snakemake schedules that job's next attempt it reports the failure again at once, with the rule's
`error:` line, instead of calling sbatch. Everything else (sbatch lines, status queries, requeue, logs, the
settings, under the `ctpo-slurm-` prefix) is the SLURM plugin's own. Preempted jobs are requeued by SLURM
(--requeue); a TIMEOUT, an exit 75 (saved and stopped before the time limit) or any other failure is resubmitted
as before and resumes from its checkpoint.

More than one node: the plugin's `--gpus=<type>:<gpu>` is a total for the job, and SLURM may spread it over the
nodes in any way. A job with `nodes` > 1 that asks for GPUs is submitted with `--gres=gpu:<type>:<gpu>` (`gpu`
GPUs per node; the type is `gpu_model`, the slurm profile's) and `--ntasks-per-node=1` instead (the plugin's
`set_gres_string`, which its `run_job` calls, is wrapped for this); a job with its own `gres` keeps the plugin's
arguments (SLURM reads --gres per node) plus `--ntasks-per-node=1`. One node is unchanged.
"""
from __future__ import annotations

import re
from pathlib import Path

import snakemake_executor_plugin_slurm as _slurm
from snakemake_executor_plugin_slurm import Executor as SlurmExecutor
from snakemake_executor_plugin_slurm import ExecutorSettings, common_settings  # noqa: F401 (the plugin's interface)
from snakemake_interface_common.exceptions import WorkflowError
from snakemake_interface_executor_plugins.executors.base import SubmittedJobInfo

from ctpo.exitcodes import EXIT_PERMANENT, last_error_line, permanent_in_log


def _read(path) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except (OSError, TypeError):
        return ""


_plugin_gres_string = _slurm.set_gres_string


def gres_string(job) -> str:
    """The plugin's GPU arguments for one node; per node and one task per node for more than one."""
    res = job.resources
    nodes, gpu = res.get("nodes") or 1, res.get("gpu")
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes <= 1:
        return _plugin_gres_string(job)
    if res.get("gres"):  # the experiment's own gres: SLURM's --gres is per node already
        return _plugin_gres_string(job) + " --ntasks-per-node=1"
    if not gpu:
        return _plugin_gres_string(job)
    model = res.get("gpu_model")
    if model and not _GPU_MODEL.match(str(model)):
        raise WorkflowError(f"Invalid GPU model format: {model}. Expected format: '<name>' (e.g., 'tesla')")
    if not isinstance(gpu, int) or isinstance(gpu, bool) or gpu < 1:
        raise WorkflowError(f"rule {job.name}: gpu must be a positive integer (GPUs per node), not {gpu!r}")
    return f" --gres=gpu:{model}:{gpu} --ntasks-per-node=1" if model else f" --gres=gpu:{gpu} --ntasks-per-node=1"


_GPU_MODEL = re.compile(r"^[a-zA-Z0-9_\.]+$")  # the plugin's (utils.set_gres_string)
_slurm.set_gres_string = gres_string  # the name the plugin's run_job / run_array_jobs call


class Executor(SlurmExecutor):
    def __init__(self, workflow, logger):
        self._permanent: dict[int, str] = {}  # Snakemake job id -> why it is not submitted again
        super().__init__(workflow, logger)

    def report_job_error(self, job_info: SubmittedJobInfo, msg=None, **kwargs):
        job = job_info.job
        if job.jobid not in self._permanent and permanent_in_log(_read((job_info.aux or {}).get("slurm_logfile"))):
            line = next(filter(None, (last_error_line(_read(log)) for log in job.log)), None)
            self._permanent[job.jobid] = (
                f"SLURM job {job_info.external_jobid} exited {EXIT_PERMANENT} (a permanent failure: a retry fails "
                f"the same way){': ' + line if line else ''}")
        super().report_job_error(job_info, msg=msg, **kwargs)

    def run_job(self, job):
        why = self._permanent.get(job.jobid)
        if why is None:
            return super().run_job(job)
        self._report_job_error_threadsafe(SubmittedJobInfo(job), f"not submitted again: {why}")
