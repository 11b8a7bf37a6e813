"""`python -m kiln <stage> [overrides]`, the same as the `kiln` console script."""

import shlex
import signal
import sys

# First thing, before kiln.cli is imported: from here on a signal ends kiln with one line (exit
# 130 / 143), not with a KeyboardInterrupt traceback or a silent death by SIGTERM.
from kiln.interrupts import Interrupted, install

install()
try:
    from kiln.cli import main
except (Interrupted, KeyboardInterrupt) as exc:
    stopped = exc if isinstance(exc, Interrupted) else Interrupted(signal.SIGINT)
    print(
        f"kiln: interrupted by {stopped.signal_name} before it started; run it again: "
        f"python -m kiln {shlex.join(sys.argv[1:])}",
        file=sys.stderr,
        flush=True,
    )
    sys.exit(stopped.exit_code)

sys.exit(main())
