"""Fair share between drop users: owners take turns for the engine (core/ordering.py,
service/queues.py, the intake's claim order and per-owner cap), on real files owned by two uids."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from inpaintd.core.ordering import fair_order
from inpaintd.service.queues import ArrivalQueue
from inpaintd.store.spool import Claim
from inpaintd.store.status import format_status
from test_service import Daemon, wait_until

A, B = 4101, 4102  # uids with no passwd entry: shown as "uid N"


def claim(name: str, owner: int, arrived: float) -> Claim:
    return Claim(Path("/nonexistent") / name, {"job_id": name, "name": name, "arrived": arrived, "owner": owner})


# An event is an arrival (owner, arrival time) or a pick (None).
events = st.lists(st.one_of(st.tuples(st.integers(0, 4), st.floats(0, 100)), st.none()), max_size=200)


@settings(max_examples=300, deadline=None)
@given(events)
def test_no_owner_with_a_queued_job_waits_more_than_the_number_of_owners_picks(sequence):
    jobs = ArrivalQueue()
    owners = {e[0] for e in sequence if e is not None}
    waited: dict[int, int] = {}  # owner with a job queued -> picks of others since it was last picked or arrived
    for serial, event in enumerate(sequence):
        if event is not None:
            owner, when = event
            jobs.put(claim(f"j{serial}", owner, when))
            waited.setdefault(owner, 0)
            continue
        if jobs.empty():
            continue
        expected_order = jobs.names()
        job = jobs.get_nowait()
        assert job.name == expected_order[0]  # status shows the order the worker takes
        owner = job.owner
        # FIFO within one owner: none of its queued jobs arrived before the one picked
        assert all(c.arrived >= job.arrived for c in _queued(jobs) if c.owner == owner)
        for other in list(waited):
            if other != owner:
                waited[other] += 1
                assert waited[other] <= len(owners), (other, waited)
        waited[owner] = 0
        if not any(c.owner == owner for c in _queued(jobs)):
            del waited[owner]


def _queued(jobs: ArrivalQueue) -> list[Claim]:
    with jobs.mutex:
        return [c for line in jobs.queue.values() for _, _, c in line]


def test_a_flood_by_one_owner_lets_the_next_owner_in_after_one_job_and_fifo_stays_available():
    jobs = ArrivalQueue()
    for i in range(40):
        jobs.put(claim(f"a{i}", A, float(i)))
    assert jobs.get().name == "a0"  # in progress when B drops its job
    jobs.put(claim("b0", B, 100.0))
    assert jobs.names()[:3] == ["b0", "a1", "a2"]
    assert jobs.per_owner() == {A: 39, B: 1}
    jobs.set_fair(False)  # limits.fair_share: false, applied by a reload
    assert jobs.names()[:2] == ["a1", "a2"] and jobs.names()[-1] == "b0"
    assert [jobs.get().name for _ in range(40)][-1] == "b0"


def test_fair_order_interleaves_owners_and_keeps_each_owners_order():
    jobs = [(A, 0), (A, 1), (A, 2), (B, 3), (B, 4), (7, 5)]
    assert fair_order(jobs, {}) == [0, 3, 5, 1, 4, 2]
    # An owner with more queued already comes after the others (the intake's claim order).
    assert fair_order(jobs, {A: 5, B: 1}) == [5, 3, 0, 4, 1, 2]


def test_status_shows_the_queue_per_owner_with_names_where_they_resolve():
    text = format_status({"running": True, "pid": 1, "uptime_seconds": 5, "state": "idle", "queue_length": 3,
                          "queue_by_owner": [{"uid": A, "user": None, "queued": 2}, {"uid": 0, "user": "root", "queued": 1}],
                          "disk_guard": "outbox has 1.0 MiB free: not claiming new jobs"})
    assert f"by owner:   uid {A} 2, root 1" in text and "disk guard: outbox has" in text


def _drop_as(d: Daemon, name: str, uid: int) -> None:
    """A job uploaded by `uid`: its files written, chowned, then renamed into place (as scp/smbd do)."""
    for filename, data in ((f"{name}.png", d.image), (f"{name}.mask.png", d.mask)):
        temp = d.dirs["inbox"] / f"{filename}.part"
        temp.write_bytes(data)
        os.chown(temp, uid, uid)
        temp.rename(d.dirs["inbox"] / filename)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to two uids needs root")
def test_live_a_drops_40_jobs_then_b_drops_one_and_b_starts_after_at_most_one_of_as(tmp_path, tiny_model):
    d = Daemon(tmp_path, tiny_model, inference={"steps": 12, "prompt": "a test"})  # A's flood outlasts B's upload
    try:
        d.start()
        for i in range(40):
            _drop_as(d, f"a{i:02d}", A)
        wait_until(lambda: d.events("job.started"), 60, "A's first job to start")
        _drop_as(d, "b", B)
        d.wait_done("b", 120)
        starts = [e["job"] for e in d.events("job.started")]
        ready_b = next(i for i, e in enumerate(d.events()) if e.get("event") == "job.ready" and e.get("job") == "b")
        after_ready = [e["job"] for e in d.events()[ready_b:] if e.get("event") == "job.started"]
        assert after_ready.index("b") <= 1, after_ready[:5]  # at most the one the worker had already taken
        assert starts.index("b") < 30, starts  # plain FIFO: after all 40 of A's
        status = d.status()
        rows = {row["uid"]: row for row in status.get("queue_by_owner") or []}
        assert rows.get(A, {}).get("queued", 0) > 0 and rows[A]["user"] is None, status
        d.stop()
    finally:
        d.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to two uids needs root")
def test_live_max_queued_per_owner_leaves_the_rest_in_the_inbox_and_nothing_fails(tmp_path, tiny_model):
    d = Daemon(tmp_path, tiny_model, limits={"poison_after": 3, "max_queued_per_owner": 2})
    try:
        for i in range(8):
            _drop_as(d, f"a{i}", A)
        d.start()
        wait_until(lambda: d.status().get("queue_by_owner"), 60, "a queue")
        wait_until(lambda: d.events("job.started"), 60, "a start")
        queued = max((row["queued"] for row in d.status().get("queue_by_owner") or []), default=0)
        assert queued <= 2
        for i in range(8):
            d.wait_done(f"a{i}", 120)
        assert not list(d.dirs["failed"].iterdir())
        d.stop()
    finally:
        d.close()
