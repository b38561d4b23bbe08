"""Majority vote (cons@k) over a group's final answers, by mathematical equivalence.

Answers are clustered with the verifier's own equivalence (``fast_math_check``, then math-verify in
the scorer's killable workers: the same check that decides accuracy), so ``4``, ``4.0`` and
``4.00`` are one vote, and so are ``\\frac{1}{2}``, ``1/2`` and ``0.5``.

Rules, all independent of the order the samples arrive in:
- clustering is greedy over the distinct answers in sorted order: an answer joins the first
  cluster whose first answer it equals (math equivalence is not always transitive in practice;
  sorting makes the result deterministic);
- a cluster is correct in proportion to its members' accuracy (all members are equivalent, so
  they normally agree);
- samples without an answer do not vote; a group where none answered scores 0;
- a tie between the largest clusters scores the mean correctness of the tied clusters (the
  expected score of a uniformly random tie-break), instead of whichever came first.

>>> same = lambda a, b: a.strip("0.") == b.strip("0.")
>>> majority_vote(["4", "4.0", "4.00", "5", "5"], [1, 1, 1, 0, 0], same)
1.0
>>> majority_vote(["4", "5"], [1, 0], same)  # a tie: half credit, whichever sample came first
0.5
"""
from __future__ import annotations

from typing import Callable, Sequence

Equal = Callable[[str, str], bool]


def cluster_answers(answers: Sequence[str | None], equal: Equal) -> list[int | None]:
    """Cluster id of each answer (None for a missing answer); ids number the clusters in the
    sorted order of their first answers."""
    distinct = sorted({a.strip() for a in answers if a is not None and a.strip()})
    heads: list[str] = []
    of: dict[str, int] = {}
    for a in distinct:
        for cid, head in enumerate(heads):
            if equal(head, a):
                of[a] = cid
                break
        else:
            of[a] = len(heads)
            heads.append(a)
    return [of.get(a.strip()) if a is not None else None for a in answers]


def majority_vote(answers: Sequence[str | None], correct: Sequence[float], equal: Equal) -> float:
    """cons@k of one group (module docstring)."""
    if len(answers) != len(correct):
        raise ValueError(f"{len(answers)} answers but {len(correct)} correctness values")
    ids = cluster_answers(answers, equal)
    members: dict[int, list[float]] = {}
    for cid, c in zip(ids, correct):
        if cid is not None:
            members.setdefault(cid, []).append(float(c))
    if not members:
        return 0.0
    top = max(len(m) for m in members.values())
    tied = [sum(m) / len(m) for m in members.values() if len(m) == top]
    return sum(tied) / len(tied)
