"""Run the fewstep CLI and SIGKILL it at a chosen write: ``python crash_worker.py NAME N fewstep-args...`` kills the
process on the N-th atomic write of a file named NAME, after the temporary file is written and before the rename
(the worst moment: both the new bytes and the old name exist).  N = 0 never kills.  Used by tests/test_crash.py and
scripts/kill-campaign.py; nothing in fewstep knows about it (fewstep.io._atomic is replaced from outside)."""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from pathlib import Path


def main() -> None:
    name, nth, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    import fewstep.io as io

    real = io._atomic
    seen = 0

    def atomic(path, write) -> None:
        nonlocal seen
        path = Path(path)
        if path.name == name:
            seen += 1
            if seen == nth:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
                os.close(fd)
                write(tmp)
                os.kill(os.getpid(), signal.SIGKILL)
        real(path, write)

    io._atomic = atomic
    from fewstep.cli import main as cli

    sys.argv = ["fewstep", *argv]
    cli()


if __name__ == "__main__":
    main()
