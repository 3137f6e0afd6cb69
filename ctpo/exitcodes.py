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
