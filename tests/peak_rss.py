"""Peak memory of one `stacchip-db` run in a process of its own (tests and bench/ use it).

The CLI writes its peak RSS (VmHWM of /proc/self/status, KiB) to a file at exit. Not wait4's
ru_maxrss: that also counts the parent's memory, which a child forked from pytest (or from a
benchmark script) starts with before it execs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

MEASURED_CLI = """
import atexit, runpy, sys
def report(path=sys.argv[1]):
    with open('/proc/self/status') as status, open(path, 'w') as out:
        out.write(next(line for line in status if line.startswith('VmHWM')).split()[1])
atexit.register(report)
sys.argv = ['stacchip-db', *sys.argv[2:]]
runpy.run_module('stacchip_db.cli', run_name='__main__')
"""


def peak_rss_mib(args: list[str], env: dict[str, str], cwd: Path, report: Path) -> float:
    """Run `stacchip-db ARGS` (its output to /dev/null) with `cwd` first on sys.path; its peak
    RSS in MiB. Raises CalledProcessError, with stderr, when the command fails."""
    subprocess.run(
        [sys.executable, "-c", MEASURED_CLI, str(report), *args],
        env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    return int(report.read_text()) / 1024
