"""`python -m envs --serve [--preload alfworld,...]`: an environment worker for evaluate.py (envs.worker.serve)."""
import sys

from envs.worker import serve

if sys.argv[1:2] == ["--serve"] and (len(sys.argv) == 2 or len(sys.argv) == 4 and sys.argv[2] == "--preload"):
    serve(sys.argv[3].split(",") if len(sys.argv) == 4 else ())
else:
    sys.exit("usage: python -m envs --serve [--preload alfworld,scienceworld,bfcl]  (an environment worker for evaluate.py)")
