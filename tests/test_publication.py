"""The fenced publication protocol (store/outbox.py) under every interleaving of two devices.

The real `outbox.stage` and `outbox.publish_staged` run, one thread per device, against an
in-memory filesystem with the semantics the protocol relies on (path-based like sshfs: a
path is looked up at every operation; link(2) is no-replace; renaming a folder moves what it
holds). Every filesystem operation is one step, and a scheduler decides which device takes
the next one, so a take-over can land between any two operations of the owner, and the
owner can go on after it (a device frozen past its lease, then resumed).

Invariants, whatever the order: each job has exactly one sidecar (0 lost, 0 duplicated);
every sidecar's image is there and holds that job's bytes; no device ever removes a file
that is not its own job's; no image of a job stays without a sidecar (when identity can be
checked; with a client that caches attributes, such a leftover is allowed, nothing else).
"""

from __future__ import annotations

import itertools
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inpaintd.core.errors import TakenOver
from inpaintd.core.jobs import JobResult
from inpaintd.store import outbox

OUTBOX = Path("/share/outbox")
STATE = Path("/share/state")


# ---------------------------------------------------------------------------- the fake filesystem


@dataclass(eq=False)
class File:
    data: bytes
    job: str  # whose bytes these are (the job that wrote them), for the removal check
    mtime: int = 1_000_000


class Share:
    """One server's namespace: path -> File, or None for a folder."""

    def __init__(self) -> None:
        self.tree: dict[PurePosixPath, File | None] = {}
        for folder in ("/share", OUTBOX, STATE):
            self.tree[PurePosixPath(folder)] = None
        self.removals: list[tuple[str, str, str]] = []  # (actor's job, file's job, path)

    def parent_is_dir(self, path: PurePosixPath) -> bool:
        return path.parent in self.tree and self.tree[path.parent] is None


class DeviceFs:
    """What one device's client does with the share: outbox.OsFs's operations, one step each."""

    def __init__(self, share: Share, sched: "Scheduler", actor: str, job: str, blind: bool = False) -> None:
        self.share, self.sched, self.actor, self.job, self.blind = share, sched, actor, job, blind

    def _p(self, path: Any) -> PurePosixPath:
        return PurePosixPath(str(path))

    def _step(self, what: str) -> None:
        self.sched.step(self.actor, what)

    def lexists(self, path: Path) -> bool:
        self._step("lexists")
        return self._p(path) in self.share.tree

    def read(self, path: Path) -> bytes:
        self._step("read")
        node = self.share.tree.get(self._p(path), "missing")
        if node == "missing":
            raise FileNotFoundError(2, "No such file", str(path))
        if node is None:
            raise IsADirectoryError(21, "Is a directory", str(path))
        return node.data  # type: ignore[union-attr]

    def write(self, path: Path, data: bytes) -> None:
        self._step("write")
        p = self._p(path)
        if not self.share.parent_is_dir(p):
            raise FileNotFoundError(2, "No such file", str(path))
        self.share.tree[p] = File(data, self.job)

    def mkdir(self, path: Path) -> None:
        self._step("mkdir")
        p = self._p(path)
        if p in self.share.tree:
            return
        if not self.share.parent_is_dir(p):
            raise FileNotFoundError(2, "No such file", str(path))
        self.share.tree[p] = None

    def link(self, src: Path, dst: Path) -> None:
        self._step("link")
        s, d = self._p(src), self._p(dst)
        node = self.share.tree.get(s)
        if node is None or not self.share.parent_is_dir(d):
            raise FileNotFoundError(2, "No such file", str(src))
        if d in self.share.tree:
            raise FileExistsError(17, "File exists", str(dst))
        self.share.tree[d] = node

    def rename(self, src: Path, dst: Path) -> None:
        self._step("rename")
        s, d = self._p(src), self._p(dst)
        if s not in self.share.tree or not self.share.parent_is_dir(d):
            raise FileNotFoundError(2, "No such file", str(src))
        self._note_removal(s)
        moved = {k: v for k, v in self.share.tree.items() if k == s or s in k.parents}
        for k in moved:
            del self.share.tree[k]
        for k, v in moved.items():
            self.share.tree[d / k.relative_to(s) if k != s else d] = v

    def unlink(self, path: Path) -> None:
        self._step("unlink")
        p = self._p(path)
        if p not in self.share.tree:
            raise FileNotFoundError(2, "No such file", str(path))
        self._note_removal(p)
        del self.share.tree[p]

    def same_file(self, a: Path, b: Path) -> bool:
        self._step("same_file")
        na, nb = self.share.tree.get(self._p(a)), self.share.tree.get(self._p(b))
        if na is None or nb is None:
            raise FileNotFoundError(2, "No such file", str(a))
        return False if self.blind else na is nb  # blind: a client whose cached attributes hide the probe

    def copy_in(self, src: Path, dst: Path) -> None:  # pragma: no cover - only for an unshared outbox
        raise AssertionError("a shared outbox is never copied into")

    def _note_removal(self, path: PurePosixPath) -> None:
        """A file leaving the outbox: fine only when it is this job's and this device holds the
        job's claim right now (a device that lost its claim owns nothing any more)."""
        node = self.share.tree.get(path)
        if PurePosixPath(OUTBOX) in path.parents and isinstance(node, File):
            holds = PurePosixPath(STATE / self.actor / self.job) in self.share.tree
            self.share.removals.append((self.job if holds else f"{self.job} (claim lost)", node.job, str(path)))


# ---------------------------------------------------------------------------- the scheduler


class Scheduler:
    """Runs actor threads one filesystem step at a time, in the order `plan` asks for."""

    def __init__(self, plan: list[str]) -> None:
        self.plan = list(plan)
        self.cond = threading.Condition()
        self.waiting: set[str] = set()
        self.done: set[str] = set()
        self.turn: str | None = None
        self.trace: list[tuple[str, str]] = []

    def step(self, actor: str, what: str) -> None:
        with self.cond:
            self.waiting.add(actor)
            self.cond.notify_all()
            if not self.cond.wait_for(lambda: self.turn == actor, timeout=20):
                raise RuntimeError("scheduler stalled")
            self.turn = None
            self.trace.append((actor, what))

    def finish(self, actor: str) -> None:
        with self.cond:
            self.done.add(actor)
            self.cond.notify_all()

    def run(self, actors: dict[str, Callable[[], None]]) -> dict[str, BaseException | None]:
        outcome: dict[str, BaseException | None] = {}

        def body(name: str, fn: Callable[[], None]) -> None:
            try:
                fn()
                outcome[name] = None
            except BaseException as exc:  # noqa: BLE001 - the test inspects it
                outcome[name] = exc
            finally:
                self.finish(name)

        threads = [threading.Thread(target=body, args=item, daemon=True) for item in actors.items()]
        for thread in threads:
            thread.start()
        order = list(actors)
        last: str | None = None
        while True:
            with self.cond:
                if not self.cond.wait_for(lambda: all(a in self.waiting or a in self.done for a in order), timeout=20):
                    raise RuntimeError("an actor never reached its next step")
                ready = [a for a in order if a in self.waiting]
                if not ready:
                    break
                wanted = self.plan.pop(0) if self.plan else last
                pick = wanted if wanted in ready else ready[0]
                last = pick
                self.waiting.discard(pick)
                self.turn = pick
                self.cond.notify_all()
        for thread in threads:
            thread.join(timeout=20)
        return outcome


# ---------------------------------------------------------------------------- the devices


def painted(name: str, data: bytes, extension: str = "png") -> JobResult:
    return JobResult(name=name, image_bytes=data, extension=extension, sidecar={"schema": "x"})


def owner(fs: DeviceFs, device: str, job: str, result: JobResult) -> Callable[[], None]:
    """A device that claimed `job`: stage, record, publish (the worker's _paint and _publish)."""
    claim = STATE / device / job

    def record(progress: dict[str, Any]) -> None:
        fs.write(claim / "job.json", json.dumps(progress).encode())

    def run() -> None:
        progress = outbox.stage(claim, result, {"job_id": job}, fs=fs)
        outbox._fenced(fs, claim, record, progress)
        outbox.publish_staged(OUTBOX, claim, progress, record, fs=fs)

    return run


def taker(fs: DeviceFs, device: str, dead: str, job: str, result: JobResult) -> Callable[[], None]:
    """A device that presumes `dead` dead: renames its claim into its own, then finishes it
    from what the claim records (fleet.Keeper, worker._settle_publication), or paints it again."""
    claim = STATE / device / job

    def record(progress: dict[str, Any]) -> None:
        fs.write(claim / "job.json", json.dumps(progress).encode())

    def run() -> None:
        try:
            fs.rename(STATE / dead / job, claim)
        except FileNotFoundError:
            return  # nothing to take
        progress = json.loads(fs.read(claim / "job.json"))
        if not (outbox.is_staged(progress) and fs.lexists(claim / outbox.STAGE / outbox.STAGED_IMAGE)):
            progress = outbox.stage(claim, result, {"job_id": job}, fs=fs)  # painted again
            record(progress)
        outbox.publish_staged(OUTBOX, claim, progress, record, fs=fs)

    return run


@dataclass
class World:
    share: Share = field(default_factory=Share)

    def claim(self, device: str, job: str) -> None:
        for folder in (STATE / device, STATE / device / job):
            self.share.tree.setdefault(PurePosixPath(folder), None)
        self.share.tree[PurePosixPath(STATE / device / job / "job.json")] = File(b"{}", job)


def scenario(plan: list[str], *, take_over: bool = True, twin: bytes | None = None, blind: bool = False,
             taken: list[str] | None = None) -> tuple[World, Scheduler, dict[str, BaseException | None]]:
    world = World()
    for name in taken or []:
        body = json.dumps({"job_id": "someone", "output_file": "elsewhere.png"}).encode() if name.endswith(".json") else b"x"
        world.share.tree[PurePosixPath(OUTBOX / name)] = File(body, "someone")
    sched = Scheduler(plan)
    job = painted("cat", b"CAT")
    world.claim("A", "J")
    actors = {"A": owner(DeviceFs(world.share, sched, "A", "J", blind), "A", "J", job)}
    if take_over:
        world.share.tree.setdefault(PurePosixPath(STATE / "B"), None)
        actors["B"] = taker(DeviceFs(world.share, sched, "B", "J", blind), "B", "A", "J", job)
    if twin is not None:
        world.claim("C", "T")
        # b"CAT": identical bytes, same name; b"DOG": other bytes; b"JPG": same stem, another
        # extension (its sidecar can take our sidecar's name after our image went out).
        result = painted("cat", twin, "jpg" if twin == b"JPG" else "png")
        actors["C"] = owner(DeviceFs(world.share, sched, "C", "T", blind), "C", "T", result)
    return world, sched, sched.run(actors)


def check(world: World, sched: Scheduler, outcome: dict[str, BaseException | None], jobs: dict[str, bytes],
          blind: bool = False) -> None:
    tree = world.share.tree
    where = f"trace: {sched.trace}"
    for actor, exc in outcome.items():
        assert exc is None or isinstance(exc, TakenOver), f"{actor} raised {exc!r}; {where}"
    sidecars: dict[str, list[dict[str, Any]]] = {}
    named: set[PurePosixPath] = set()
    for path, node in tree.items():
        if path.parent == PurePosixPath(OUTBOX) and path.suffix == ".json" and isinstance(node, File):
            data = json.loads(node.data)
            if node.job == "someone":
                continue
            sidecars.setdefault(data["job_id"], []).append(data)
            image = PurePosixPath(OUTBOX) / data["output_file"]
            named.add(image)
            assert isinstance(tree.get(image), File), f"sidecar {path.name} without its image; {where}"
            assert tree[image].data == jobs[data["job_id"]], f"{image.name} holds another job's bytes; {where}"
    for job in jobs:
        assert len(sidecars.get(job, [])) == 1, f"job {job}: {len(sidecars.get(job, []))} results; {where}"
    foreign = [r for r in world.share.removals if r[0] != r[1]]
    assert not foreign, f"removed another job's file: {foreign}; {where}"
    if not blind:
        orphans = [p.name for p, n in tree.items() if p.parent == PurePosixPath(OUTBOX) and p.suffix == ".png"
                   and p not in named and isinstance(n, File) and n.job != "someone"]
        assert not orphans, f"images without a sidecar: {orphans}; {where}"


# ---------------------------------------------------------------------------- the tests


def steps_alone(**kwargs: Any) -> dict[str, int]:
    """How many steps each actor takes when it runs alone first (the length of its run)."""
    _w, sched, _o = scenario(["A"] * 200, **kwargs)
    counts: dict[str, int] = {}
    for actor, _what in sched.trace:
        counts[actor] = counts.get(actor, 0) + 1
    return counts


def test_one_device_alone_publishes_one_result() -> None:
    world, sched, outcome = scenario([], take_over=False)
    check(world, sched, outcome, {"J": b"CAT"})
    assert sorted(p.name for p in world.share.tree if p.parent == PurePosixPath(OUTBOX)) == ["cat.json", "cat.png"]


@pytest.mark.parametrize("blind", [False, True], ids=["probe", "caching-client"])
def test_a_take_over_between_any_two_steps_of_the_owner_and_the_owner_resuming_anywhere(blind: bool) -> None:
    """Every schedule with up to three switches between owner A and taker B: A runs i steps,
    B runs j, A runs on to its end, B to its end (and the symmetric ones starting with B)."""
    a_steps = steps_alone()["A"] + 2
    b_steps = 20
    runs = 0
    for first, second in (("A", "B"), ("B", "A")):
        for i, j in itertools.product(range(a_steps + 1), range(b_steps + 1)):
            plan = [first] * i + [second] * j + [first] * 60 + [second] * 60
            world, sched, outcome = scenario(plan, blind=blind)
            check(world, sched, outcome, {"J": b"CAT"}, blind=blind)
            runs += 1
    assert runs > 400


@pytest.mark.parametrize("taken", [["cat.json"], ["cat.png"], ["cat.png", "cat-1.json"]])
def test_names_taken_by_someone_else_are_never_touched(taken: list[str]) -> None:
    a_steps = steps_alone(taken=taken)["A"] + 2
    for i in range(a_steps + 1):
        world, sched, outcome = scenario(["A"] * i + ["B"] * 60 + ["A"] * 60, taken=taken)
        check(world, sched, outcome, {"J": b"CAT"})
        assert all(isinstance(world.share.tree[PurePosixPath(OUTBOX / n)], File)
                   and world.share.tree[PurePosixPath(OUTBOX / n)].job == "someone" for n in taken)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    plan=st.lists(st.sampled_from(["A", "B", "C"]), max_size=80),
    take_over=st.booleans(),
    twin=st.sampled_from([None, b"CAT", b"DOG", b"JPG"]),
    blind=st.booleans(),
)
def test_any_interleaving_of_owner_taker_and_a_job_of_the_same_name(plan: list[str], take_over: bool,
                                                                      twin: bytes | None, blind: bool) -> None:
    """Random schedules over the whole space, with a second job of the same name published at
    the same time by a third device (identical bytes or not)."""
    world, sched, outcome = scenario(plan, take_over=take_over, twin=twin, blind=blind)
    jobs = {"J": b"CAT"} if twin is None else {"J": b"CAT", "T": twin}
    check(world, sched, outcome, jobs, blind=blind)


def test_the_model_sees_the_old_defect() -> None:
    """The check can fail: the old _write_pair's unlink by name, by an owner whose claim was
    taken over, of the image the new owner published."""
    world = World()
    world.claim("B", "J")  # B took J over; A no longer holds it
    world.share.tree[PurePosixPath(OUTBOX / "cat.png")] = File(b"CAT", "J")
    fs = DeviceFs(world.share, Scheduler([]), "A", "J")
    fs._step = lambda _what: None  # type: ignore[method-assign]
    fs.unlink(OUTBOX / "cat.png")  # what `image.unlink(missing_ok=True)` did
    assert [r for r in world.share.removals if r[0] != r[1]]
