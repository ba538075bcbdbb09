"""Token lengths of step files under the embedded tokenizer: whole examples (prompt + response), responses,
actions and thoughts (median, 95th percentile, longest). Where study.sh's generation limits for BFCL come from.
Also the padding of rollout batches: each task's first prompt, in batches of 16 tasks (evaluate.py's 32 lockstep
episodes, both modes), every row as wide as its batch's longest: padded over real tokens in file order and
longest first (evaluate.py --order file / length).

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
    first = {}
    for r in recs:
        first.setdefault(r["task_id"], len(tok(steps.render_prompt(tok, r["messages"]))["input_ids"]))
    ratios = []
    for lengths in (list(first.values()), sorted(first.values(), reverse=True)):
        batches = [lengths[i:i + 16] for i in range(0, len(lengths), 16)]
        ratios.append(sum(max(b) * len(b) for b in batches) / sum(lengths))
    print(f"{path}: {len(first)} first prompts, batches of 16 padded / real tokens: file order {ratios[0]:.2f}, "
          f"longest first {ratios[1]:.2f}")
