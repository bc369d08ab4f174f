"""Whose job goes next when several people share one device: owners take turns. Pure.

`fair_pick` is the rule the worker's queue (service/queues.py) applies at every pick, and
`fair_order` the same rule run forward over a list (the order `inpaintd status` shows, and
the order the intake claims a look's ready jobs in).
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Sequence


def fair_pick(heads: Mapping[Hashable, Any], last_served: Mapping[Hashable, int]) -> Hashable:
    """Whose turn it is among the owners with a job waiting (`heads`: owner -> the sort key of
    that owner's oldest job): the one served least recently (never served: before everyone),
    ties by the oldest job. Each owner served since another became ready has a later turn
    than it, so an owner with a job waits at most (number of owners - 1) picks."""
    return min(heads, key=lambda owner: (last_served.get(owner, -1), heads[owner]))


def fair_order(jobs: Sequence[tuple[Hashable, Any]], last_served: Mapping[Hashable, int]) -> list[int]:
    """The indices of `jobs` ((owner, sort key) each) in the order repeated `fair_pick`s take
    them, starting from `last_served` (owner -> its last turn, larger is later)."""
    lines: dict[Hashable, list[tuple[Any, int]]] = {}
    for index, (owner, key) in enumerate(jobs):
        lines.setdefault(owner, []).append((key, index))
    for line in lines.values():
        line.sort(reverse=True)  # pop() takes the oldest
    served = dict(last_served)
    turn = max(served.values(), default=-1)
    out: list[int] = []
    while lines:
        owner = fair_pick({o: line[-1] for o, line in lines.items()}, served)
        out.append(lines[owner].pop()[1])
        if not lines[owner]:
            del lines[owner]
        turn += 1
        served[owner] = turn
    return out
