"""The CPU accounting bench.daemon reports per job: /proc read right, children included."""

from __future__ import annotations

import subprocess
import sys
import time

from bench.daemon import cpu_seconds

BUSY = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass"


def test_a_process_and_its_children_are_counted() -> None:
    # A parent that only waits, and a child that spins for 0.3 s of CPU: as php-fpm's master
    # and a worker.
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import subprocess, sys; subprocess.run([sys.executable, '-c', {BUSY!r}])",
        ]
    )
    try:
        time.sleep(0.25)  # the child is running by now, well short of its 0.3 s
        with_children = cpu_seconds(parent.pid, children=True)
        alone = cpu_seconds(parent.pid)
    finally:
        parent.wait(10)
    assert with_children - alone >= 0.05  # the child's CPU so far
    assert alone < 0.25  # the parent's start-up only


def test_a_process_that_has_gone_counts_nothing() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert cpu_seconds(gone.pid) == 0
    assert cpu_seconds(gone.pid, children=True) == 0
