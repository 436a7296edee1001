"""A test seam: stop a merge (or a pipeline step) at a named point so a test can kill it there.

With ``SCF_FAULT_PAUSE=<point>`` set, a merge reaching that point writes the file named by
``SCF_FAULT_MARKER`` (its content: the process id) and waits until that file is deleted, then goes
on. A test waits for the marker, then kills the process (or changes the world, e.g. fills the disk,
and deletes the marker to let it continue). Unset (always, outside tests), `pause` costs one
environment lookup.

Points (in the order a merge reaches them):

- ``before_first_shard``: the temporary output directory and its lock exist, nothing is written;
- ``between_shards``: the first shard is complete and closed, the next not yet opened (the writer
  thread waits; needs at least two shards);
- ``final_rename``: everything is written and fsynced; with ``--overwrite`` the previous output has
  just been moved aside, and the new one is not yet renamed into place.

And one point of the pipeline (``tasks.results_db``): ``duckdb_write``, inside the transaction that
stores a model's results, after its rows are inserted and before the commit.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PAUSE_ENV = "SCF_FAULT_PAUSE"
MARKER_ENV = "SCF_FAULT_MARKER"
POINTS = ("before_first_shard", "between_shards", "final_rename", "duckdb_write")


def pause(point: str) -> None:
    """Wait at ``point`` while the marker file exists, if ``SCF_FAULT_PAUSE`` names it.

    Args:
        point: one of `POINTS`.
    """
    if os.environ.get(PAUSE_ENV) != point:
        return
    marker = Path(os.environ.get(MARKER_ENV) or f"scf-fault-{point}.marker")
    marker.write_text(str(os.getpid()))
    while marker.exists():
        time.sleep(0.01)
