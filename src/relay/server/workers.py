"""``relay serve --workers N``: the parent process, kept light until the metrics are set up.

prometheus-client reads ``PROMETHEUS_MULTIPROC_DIR`` once, when it is first imported, so
the directory is made and named here before anything imports it; only then is the relay
imported (once: :func:`relay.server.serve.run_workers` forks the workers from this process).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable

from ..config import RelayConfig

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"


def serve_workers(config: RelayConfig, preflight: Callable[[RelayConfig], None]) -> int:
    """Run the workers with their metrics in a fresh directory (old files would add a
    previous run's counts), removed at exit; return an exit status.

    ``preflight`` (the upstream check) runs once the directory is named: it imports the relay,
    and the relay imports prometheus-client. Run before, it would make every worker a spawned
    process importing the relay again, a quarter of a second each, instead of a fork.
    """
    metrics_dir = tempfile.mkdtemp(prefix="relay-metrics-")
    inherited = os.environ.get(MULTIPROC_DIR)
    os.environ[MULTIPROC_DIR] = metrics_dir
    try:
        from .serve import run_workers

        preflight(config)
        return run_workers(config, metrics_dir)
    finally:
        if inherited is None:
            os.environ.pop(MULTIPROC_DIR, None)
        else:
            os.environ[MULTIPROC_DIR] = inherited
        shutil.rmtree(metrics_dir, ignore_errors=True)
