"""What every script's command line shares: numeric flags checked at parse time (one line naming the flag),
and Ctrl-C or SIGTERM ending a stage with one line instead of a traceback (every stage resumes).
"""
import math
import os
import signal
import sys

def check_numbers(args, rules, fail):
    """Validate numeric flags at parse time: rules = {name: (low, high)}, either bound None for open and a
    bound given as ("<", x) exclusive; every float must be finite (nan and inf never reach the code).
    fail(one line naming the flag) on the first bad value."""
    for name, (low, high) in rules.items():
        value = getattr(args, name)
        flag = "--" + name.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"{flag} must be a finite number, got {value}")
        for bound, below in ((low, True), (high, False)):
            if bound is None:
                continue
            strict, x = bound if isinstance(bound, tuple) else ("", bound)
            bad = (value <= x if strict else value < x) if below else (value >= x if strict else value > x)
            if bad:
                rel = (">" if strict else ">=") if below else ("<" if strict else "<=")
                fail(f"{flag} must be {rel} {x}, got {value}")


def exit_on_signals():
    """SIGINT (Ctrl-C) and SIGTERM end the process with one line and no traceback, as a kill would: every
    stage writes whole records and resumes, so there is nothing to clean up."""
    def handler(signum, frame):
        name = signal.Signals(signum).name
        os.write(2, f"\n{os.path.basename(sys.argv[0])}: stopped by {name}; rerun the same command to resume\n".encode())
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
