"""The worker's two lines: claims waiting their turn, and held jobs waiting out an error.

Claims take turns by owner (the uid that dropped the job, `Claim.owner`): the owner served
least recently goes next, an owner never served before first, and within one owner the oldest
arrival first (`fair_pick`). So one user's flood of 500 jobs delays another user's next job
by at most the job in progress plus one turn of each other owner. `limits.fair_share: false`
gives one FIFO by arrival.

A job that hit a transient error (disk full, an unwritable folder) leaves the arrival queue
and waits in `HeldJobs` with its own back-off; the jobs behind it keep flowing. After
`hold_timeout` of such errors in a row it is due to fail (`expired`). Pure: the clock is a
parameter everywhere.
"""

from __future__ import annotations

import heapq
import itertools
import queue
from dataclasses import dataclass
from typing import Any

from ..core.boundary import retry_delay
from ..core.ordering import fair_order, fair_pick
from ..store.spool import Claim

# Painted results kept in memory for held jobs, so a full outbox costs a retry of the write,
# not of the painting; beyond this the job is painted again when its turn comes.
HELD_RESULT_BYTES = 64 * 1024 * 1024


ANYONE = -1  # the owner every claim has under plain FIFO


class ArrivalQueue(queue.Queue):  # type: ignore[type-arg]
    """Claims waiting for the engine: owners take turns (`fair_pick`), each owner's oldest
    arrival first; with fair=False one line, oldest arrival first.

    By arrival, not by readiness: a job whose files took longer to be confirmed complete (a
    close lost in an inotify overflow, a slower upload of one part) goes ahead of that owner's
    jobs that arrived after it. Equal arrivals keep the order they were put in (the intake
    puts them oldest first). Arrival is `Claim.order`: this process's own claims by its
    monotonic clock (a wall clock stepped back by NTP reorders nothing), claims recovered at
    start or taken over from another device before them, by their recorded wall time.
    """

    def __init__(self, maxsize: int = 0, fair: bool = True) -> None:
        self.fair = fair
        super().__init__(maxsize)

    def _init(self, maxsize: int) -> None:
        self.queue: dict[Any, list[tuple[tuple[int, float], int, Claim]]] = {}  # type: ignore[assignment]
        self._order = itertools.count()
        self._turns = itertools.count()
        self._served: dict[Any, int] = {}  # owner -> the turn it last had

    def _owner(self, claim: Claim) -> Any:
        return claim.owner if self.fair else ANYONE

    def _qsize(self) -> int:
        return sum(len(line) for line in self.queue.values())

    def _put(self, claim: Claim) -> None:
        heapq.heappush(self.queue.setdefault(self._owner(claim), []), (claim.order, next(self._order), claim))

    def _get(self) -> Claim:
        owner = fair_pick({o: line[0][:2] for o, line in self.queue.items()}, self._served)
        line = self.queue[owner]
        claim = heapq.heappop(line)[2]
        if not line:
            del self.queue[owner]
        self._served[owner] = next(self._turns)
        return claim

    def _in_order(self) -> list[Claim]:
        items = [(owner, entry) for owner, line in self.queue.items() for entry in line]
        order = fair_order([(owner, entry[:2]) for owner, entry in items], self._served)
        return [items[i][1][2] for i in order]

    def names(self) -> list[str]:
        """Job names in the order they will run."""
        with self.mutex:
            return [claim.name for claim in self._in_order()]

    def per_owner(self) -> dict[int, int]:
        """Queued claims by owner uid (every claim's, whatever the fair switch says)."""
        with self.mutex:
            counts: dict[int, int] = {}
            for line in self.queue.values():
                for _, _, claim in line:
                    counts[claim.owner] = counts.get(claim.owner, 0) + 1
            return counts

    def set_fair(self, fair: bool) -> None:
        """Switch between turns by owner and one FIFO (a reload); the queued claims are kept."""
        with self.mutex:
            if fair == self.fair:
                return
            claims = [claim for line in self.queue.values() for _, _, claim in line]
            self.fair = fair
            self.queue = {}
            for claim in claims:
                self._put(claim)


@dataclass
class Held:
    """A claimed job waiting out a transient error."""

    claim: Claim
    since: float  # first transient error of this run of them (monotonic)
    retry_at: float
    failures: int
    code: str
    message: str
    result: Any = None  # the painted JobResult when only publication failed
    pending_failure: Any = None  # a JobError that could not be recorded yet (failed/ or state unwritable)


class HeldJobs:
    """Held jobs by job id; the one due first is retried first."""

    def __init__(self, hold_timeout: float, base: float = 1.0, cap: float = 60.0) -> None:
        self.hold_timeout = hold_timeout
        self.base = base
        self.cap = cap
        self._held: dict[str, Held] = {}

    def __len__(self) -> int:
        return len(self._held)

    def hold(
        self, claim: Claim, code: str, message: str, now: float, previous: Held | None = None,
        result: Any = None, pending_failure: Any = None,
    ) -> Held:
        failures = previous.failures + 1 if previous is not None else 1
        since = previous.since if previous is not None else now
        if result is None and previous is not None:
            result = previous.result
        if pending_failure is None and previous is not None:
            pending_failure = previous.pending_failure
        if result is not None and self._result_bytes() + _size(result) > HELD_RESULT_BYTES:
            result = None
        held = Held(claim, since, now + retry_delay(failures, self.base, self.cap), failures, code, message,
                    result, pending_failure)
        self._held[claim.job_id] = held
        return held

    def expired(self, held: Held, now: float) -> bool:
        """Held for longer than hold_timeout: the job is to fail (retries_exhausted)."""
        return now - held.since >= self.hold_timeout

    def pop_due(self, now: float) -> Held | None:
        due = [h for h in self._held.values() if h.retry_at <= now]
        if not due:
            return None
        first = min(due, key=lambda h: (h.retry_at, h.claim.order))
        del self._held[first.claim.job_id]
        return first

    def next_in(self, now: float) -> float | None:
        """Seconds until the next held job is due; None when none is held."""
        if not self._held:
            return None
        return max(0.0, min(h.retry_at for h in self._held.values()) - now)

    def names(self) -> list[str]:
        return [h.claim.name for h in sorted(self._held.values(), key=lambda h: h.retry_at)]

    def first(self) -> Held | None:
        return min(self._held.values(), key=lambda h: h.retry_at, default=None)

    def _result_bytes(self) -> int:
        return sum(_size(h.result) for h in self._held.values() if h.result is not None)


def _size(result: Any) -> int:
    return len(getattr(result, "image_bytes", b""))
