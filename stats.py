"""The intervals the report gives: a bootstrap of the mean, Wilson's interval of a proportion, Fisher's exact
test, a crossed bootstrap over training seeds and items, and a t interval over seed means.

Hand-written, not scipy.stats: each is a few lines checked in tests against known values (the t table
against a numerical quantile to 0.0015), scipy would be a 40 MB dependency of the report alone, and its
bootstrap (BCa by default) and exact t quantiles would change every published number's last digit.
"""
import math

import numpy as np


def mean_ci(values, seed=0, n_boot=1000):
    """(mean, low, high): the mean of numbers/bools (None skipped) and its bootstrap 95% interval."""
    x = np.array([float(v) for v in values if v is not None])
    if len(x) == 0:
        return None, None, None
    rng = np.random.default_rng(seed)
    boots = x[rng.integers(0, len(x), (n_boot, len(x)))].mean(1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return round(float(x.mean()), 4), round(float(lo), 4), round(float(hi), 4)


def wilson(successes, n, z=1.96):
    """Wilson score 95% interval of a proportion: unlike the bootstrap, not degenerate at 0 or n successes
    (0 of 64 gives [0, 0.057], not [0, 0])."""
    if not n:
        return None, None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)


def fisher_greater(a, n_a, b, n_b):
    """One-sided Fisher exact p-value that a/n_a is above b/n_b: the probability, with the margins fixed,
    of a or more of the a + b successes falling in the first group (hypergeometric tail)."""
    k, total = a + b, n_a + n_b
    tail = sum(math.comb(n_a, i) * math.comb(n_b, k - i) for i in range(a, min(n_a, k) + 1))
    return tail / math.comb(total, k)


def summarize(records, keys, metrics, seed=0):
    """One row per distinct value of `keys`: n and, per metric, its mean with _lo/_hi bootstrap bounds."""
    groups = {}
    for rec in records:
        groups.setdefault(tuple(rec.get(k) for k in keys), []).append(rec)
    rows = []
    for key in sorted(groups, key=lambda k: tuple(str(x) for x in k)):
        recs = groups[key]
        row = dict(zip(keys, key), n=len(recs))
        for m in metrics:
            row[m], row[f"{m}_lo"], row[f"{m}_hi"] = mean_ci([r.get(m) for r in recs], seed)
        rows.append(row)
    return rows


def seeds_and_items(groups, seed, n_boot=2000):
    """(mean, low, high) pooled over training seeds: the mean of the seed means, and a 95% interval from a
    crossed bootstrap that draws the seeds and the items (steps, conflicts or games) together, one item draw
    shared by every drawn seed, since every seed is measured on the same items. So the interval holds
    between-seed variation and the items' (drawing the items anew for each seed would shrink the items' part
    by the number of seeds). groups = {seed: {item: value}}; an item a seed lacks is left out of that seed's
    mean. With one seed it is the items' bootstrap alone, with no between-seed variation in it: say so."""
    seeds = sorted(groups, key=str)
    items = sorted({i for g in groups.values() for i in g}, key=str)
    x = np.array([[groups[s].get(i, np.nan) for i in items] for s in seeds], float)  # seeds x items
    seen = ~np.isnan(x)
    x = np.nan_to_num(x)
    rng = np.random.default_rng(seed)
    boots = np.empty(n_boot)
    for b in range(n_boot):
        rows, cols = rng.integers(0, len(seeds), len(seeds)), rng.integers(0, len(items), len(items))
        sums, counts = x[rows][:, cols].sum(1), seen[rows][:, cols].sum(1)
        boots[b] = np.mean(sums[counts > 0] / counts[counts > 0])
    lo, hi = np.nanpercentile(boots, [2.5, 97.5])
    mean = np.mean([x[j][seen[j]].mean() for j in range(len(seeds))])
    return round(float(mean), 4), round(float(lo), 4), round(float(hi), 4)


# Two-sided 95% quantiles of Student's t by degrees of freedom (seeds - 1); past 30 the value at 30, at most 4.2%
# wider than the exact one (never narrower: 1.96 would be).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
        29: 2.045, 30: 2.042}


def seed_t_interval(groups):
    """'[low, high]': a t interval over the seed means, each seed one observation: between-seed variation
    alone (the items are the same for every seed), with the width t gives few seeds (t = 4.30 for 3), where
    the bootstrap draws only 10 distinct sets of 3 seeds. A check beside seeds_and_items; '' with one seed."""
    means = [float(np.mean(list(groups[k].values()))) for k in groups]
    if len(means) < 2:
        return ""
    half = T975[min(len(means) - 1, 30)] * float(np.std(means, ddof=1)) / len(means) ** 0.5
    return f"[{np.mean(means) - half:.2f}, {np.mean(means) + half:.2f}]"
