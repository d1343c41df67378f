"""The errors raydistill raises on purpose: what the user did, or what is missing, and how to fix it.

Library code raises these; only the CLI entry point (``workflows/cli.py::main``) turns them into a message on
stderr and an exit code (:attr:`RaydistillError.exit_code`). Anything else escaping a verb is a bug and keeps
its traceback. :class:`~raydistill.tasks.config.ConfigError` (exit code 2) lives next to the config it checks.
"""

from __future__ import annotations


class RaydistillError(Exception):
    """Base class: the message names what is wrong and how to fix it."""

    exit_code = 1


class StageMissingError(RaydistillError):
    """A verb needs the output of an earlier stage that has not finished in this run directory."""


class DataError(RaydistillError):
    """Stored data (a cache shard, a stage's output) is missing or fails its checksum."""


class JobError(RaydistillError):
    """A submitted Ray job is still running (not doubled) or ended without succeeding."""


class WorkerLostError(RaydistillError):
    """Ray lost the processes or nodes doing the work (actors, their nodes) more often than the configured
    retries allow; rerunning resumes from what was committed."""
