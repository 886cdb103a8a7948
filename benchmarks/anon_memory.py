"""Peak anonymous memory of a child process, sampled from /proc: the benchmarks' one memory probe.

RssAnon, not RSS: pages of the float16 memory maps are page cache, which the kernel reclaims, while anonymous
memory is what `--memory` bounds and what runs a node out of RAM.
"""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path


def anon_bytes(pid: int) -> int | None:
    """RssAnon of `pid` in bytes; None once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return 0  # a zombie has no memory lines


def communicate_sampled(proc: subprocess.Popen, every: float = 0.02) -> tuple[str, int]:
    """(stdout, peak RssAnon bytes) of `proc`, sampled every `every` seconds until it ends."""
    stop, peak = threading.Event(), [0]

    def sample() -> None:
        while not stop.is_set() and (now := anon_bytes(proc.pid)) is not None:
            peak[0] = max(peak[0], now)
            stop.wait(every)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = proc.communicate()
    stop.set()
    sampler.join()
    return stdout, peak[0]
