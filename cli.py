"""What every script's command line shares: numeric flags checked at parse time (one line naming the flag),
and Ctrl-C, SIGTERM or a refused write ending a stage with one line instead of a traceback (every stage
resumes).
"""
import errno
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


def exit_cleanly():
    """End a stage with one line, never a traceback, where the cause is outside the code:
    - SIGINT (Ctrl-C) and SIGTERM end the process as a kill would: every stage writes whole records and resumes,
      so there is nothing to clean up;
    - a write that fails mid-run (disk full, a folder made read-only, a quota) ends it with one error line naming
      the file: what was written before stays (appends are flushed per record, other files written whole), and
      rerunning the same command resumes."""
    def handler(signum, frame):
        name = signal.Signals(signum).name
        os.write(2, f"\n{os.path.basename(sys.argv[0])}: stopped by {name}; rerun the same command to resume\n".encode())
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)

    def excepthook(kind, value, tb):
        if isinstance(value, OSError) and value.errno in WRITE_ERRNOS:
            where = value.filename or "an output file"
            sys.stderr.write(f"\nerror: cannot write {where} ({value.strerror}); what was written before is kept: "
                             f"make room or fix the permissions, then rerun the same command to resume\n")
            sys.exit(1)
        sys.__excepthook__(kind, value, tb)
    sys.excepthook = excepthook


# errno values of a write the machine refused: no space, no permission, a read-only file system, a quota, a
# file-size limit.
WRITE_ERRNOS = {errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS, errno.EDQUOT, errno.EFBIG}


def comma_list(text, flag):
    """The items of a comma list flag, each once: a repeated item (--env bfcl,bfcl) is dropped with a note on
    stderr, since running it twice would count its episodes twice."""
    items = [x for x in text.split(",") if x]
    unique = list(dict.fromkeys(items))
    if len(unique) < len(items):
        print(f"note: {flag} lists {', '.join(sorted({x for x in items if items.count(x) > 1}))} more than once; "
              f"each is taken once", file=sys.stderr)
    return unique
