"""Token lengths of step files under the embedded tokenizer: whole examples (prompt + response), responses,
actions and thoughts (median, 95th percentile, longest). Where study.sh's generation limits for BFCL come from.

    .venv/bin/python bench/token_lengths.py data/study_bfcl/bfcl_train.jsonl data/study_bfcl/bfcl_ood_test.jsonl
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lm  # noqa: E402
import steps  # noqa: E402

tok = lm.load_tokenizer(lm.resolve_model(lm.EMBEDDED))
for path in sys.argv[1:]:
    recs = steps.read_steps(path)
    whole = np.array([len(lm.encode_step(tok, r)[0]) for r in recs])
    for name, xs in (("example", whole), ("action", np.array([len(tok(r["action"])["input_ids"]) for r in recs])),
                     ("thought", np.array([len(tok(r["thought"])["input_ids"]) for r in recs]))):
        print(f"{path}: {len(recs)} steps, {name} tokens median {np.median(xs):.0f}, 95th pct {np.percentile(xs, 95):.0f}, "
              f"longest {xs.max()}, total {xs.sum()}")
