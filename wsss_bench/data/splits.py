"""Case-level splits, image-level slice labels and the test-set composition (docs/protocol.md §4.3-5).

All rounding is round(x) = floor(x + 0.5), done in exact rational arithmetic.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np

from wsss_bench.errors import UserError

POSITIVE, NEGATIVE, AMBIGUOUS = 1, 0, -1
#: the paper's BraTS test composition: 5,802 positive and 1,073 negative slices
TEST_NEG_PER_POS = Fraction(1073, 5802)
SPLITS = ("train", "val", "test")


def round_half_up(x: Fraction | int) -> int:
    """floor(x + 1/2), exactly."""
    return int(np.floor(Fraction(x) + Fraction(1, 2)))


def split_sizes(n: int, rule: str) -> tuple[int, int, int]:
    """(n_train, n_val, n_test) for ``n`` cases.

    - ``tenths`` (BraTS): n_val = n_test = max(1, round(0.1 n)), the rest train;
    - ``flare21``: n_train = round(n 211/361), n_val = max(1, round(n 50/361)), the rest test;
    - ``counts:A/B/C`` (phantoms of a profile with ``phantom_split``): exactly A/B/C cases,
      for n = A + B + C (docs/protocol.md §10: phantoms may get a larger test share than real data).
    """
    if rule.startswith("counts:"):
        try:
            n_train, n_val, n_test = (int(v) for v in rule.split(":", 1)[1].split("/"))
        except ValueError:
            raise ValueError(f"split rule {rule!r}: expected counts:TRAIN/VAL/TEST") from None
        if n_train + n_val + n_test != n:
            raise UserError(f"the phantom split {n_train}/{n_val}/{n_test} needs {n_train + n_val + n_test} "
                            f"cases, the phantom has {n}; regenerate the phantom or fix the profile's phantom_split")
    elif rule == "tenths":
        n_val = max(1, round_half_up(Fraction(n, 10)))
        n_test = n_val
        n_train = n - n_val - n_test
    elif rule == "flare21":
        n_train = round_half_up(Fraction(n * 211, 361))
        n_val = max(1, round_half_up(Fraction(n * 50, 361)))
        n_test = n - n_train - n_val
    else:
        raise ValueError(f"unknown split rule {rule!r}; use 'tenths', 'flare21' or 'counts:A/B/C'")
    if min(n_train, n_val, n_test) < 1:
        raise UserError(
            f"{n} case(s) cannot be split into train/val/test by the '{rule}' rule "
            f"({n_train}/{n_val}/{n_test}); at least 3 cases are needed"
        )
    return n_train, n_val, n_test


def case_split(case_ids: list[str], rule: str, seed: int) -> dict[str, list[str]]:
    """Permute the sorted ids with ``seed``; first n_train -> train, next n_val -> val, rest test.

    Each returned list is sorted.
    """
    ids = sorted(case_ids)
    n_train, n_val, _ = split_sizes(len(ids), rule)
    order = np.random.default_rng(seed).permutation(len(ids))
    perm = [ids[k] for k in order]
    return {
        "train": sorted(perm[:n_train]),
        "val": sorted(perm[n_train : n_train + n_val]),
        "test": sorted(perm[n_train + n_val :]),
    }


def slice_labels(fg_fraction: np.ndarray, threshold: float = 0.01) -> np.ndarray:
    """1 if f > threshold, 0 if f == 0, -1 (ambiguous) otherwise; int8."""
    f = np.asarray(fg_fraction, dtype=np.float64)
    out = np.full(f.shape, AMBIGUOUS, dtype=np.int8)
    out[f > threshold] = POSITIVE
    out[f == 0] = NEGATIVE
    return out


def n_test_negatives(n_pos: int, ratio: Fraction = TEST_NEG_PER_POS) -> int:
    """round(n_pos * 1073 / 5802)."""
    return round_half_up(n_pos * Fraction(ratio))


def compose_test(
    positives: np.ndarray, pool: np.ndarray, seed: int, ratio: Fraction = TEST_NEG_PER_POS
) -> tuple[np.ndarray, dict]:
    """All ``positives`` plus a seeded subset of ``pool`` (all of it if too small).

    Returns the sorted row indices and a record of what was achieved.
    """
    positives = np.sort(np.asarray(positives, dtype=np.int64))
    pool = np.sort(np.asarray(pool, dtype=np.int64))
    target = n_test_negatives(len(positives), ratio)
    if target >= len(pool):
        chosen = pool
    else:
        chosen = np.sort(np.random.default_rng(seed).choice(pool, size=target, replace=False))
    n = len(positives) + len(chosen)
    info = {
        "n_pos": int(len(positives)),
        "n_neg": int(len(chosen)),
        "n_neg_target": int(target),
        "negative_pool": int(len(pool)),
        "pool_too_small": bool(target > len(pool)),
        "negative_share_target": float(Fraction(ratio) / (1 + Fraction(ratio))),
        "negative_share": float(len(chosen) / n) if n else 0.0,
        "neg_per_pos": float(len(chosen) / len(positives)) if len(positives) else 0.0,
    }
    return np.sort(np.concatenate([positives, chosen])), info
