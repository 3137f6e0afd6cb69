"""Exit codes every `python -m ctpo.<stage>` entry point uses, so the workflow can tell what a retry can fix.

EXIT_PREEMPTED (75, EX_TEMPFAIL): the job was stopped (signal, deadline) after saving; a rerun resumes.
EXIT_PERMANENT (78, EX_CONFIG): bad config, missing model or data, failed preflight; a rerun fails the same way,
so the workflow must not resubmit it.
"""
from __future__ import annotations

import sys

EXIT_PREEMPTED = 75
EXIT_PERMANENT = 78


class PermanentError(Exception):
    """A failure no retry can fix. Entry points turn it into one line on stderr and EXIT_PERMANENT."""


def fail_permanent(message: str) -> "NoReturn":  # noqa: F821
    """Print `message` as one line on stderr and exit with EXIT_PERMANENT."""
    print(" ".join(str(message).split()), file=sys.stderr, flush=True)
    raise SystemExit(EXIT_PERMANENT)


# How a Snakemake job step reports a rule whose shell command exited EXIT_PERMANENT (Python's CalledProcessError
# text, printed into the SLURM job's log): what the workflow's executor reads to not resubmit the job.
_PERMANENT_IN_LOG = f"returned non-zero exit status {EXIT_PERMANENT}."


def permanent_in_log(text: str) -> bool:
    """True when a job's SLURM log says its rule's command exited EXIT_PERMANENT."""
    return _PERMANENT_IN_LOG in text


def last_error_line(text: str) -> str | None:
    """The last `error: ...` line of a rule's log (the one line an entry point prints before exiting)."""
    lines = [x.strip() for x in text.splitlines() if x.startswith("error:")]
    return lines[-1] if lines else None
