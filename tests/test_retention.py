"""Retention (store/retention.py): budgets, oldest first, the minimum age, whole records, a kill -9
mid-prune, two pruners on one folder, and a live daemon pruning what it wrote."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from inpaintd.store.retention import (
    DAY,
    ORPHAN_GRACE,
    Budget,
    Reason,
    Record,
    list_records,
    prune,
    select,
)

NOW = 1_900_000_000.0


def rec(name: str, age_days: float, size: int = 100, orphan: bool = False) -> Record:
    return Record(name, (name,), (0,), NOW - age_days * DAY, size, orphan)


def test_select_removes_past_the_age_then_oldest_first_to_the_budget_and_nothing_younger_than_min_age():
    records = [rec("new", 0.5, 500), rec("a", 10), rec("b", 5), rec("c", 40), rec("d", 2)]
    got = select(records, NOW, Budget(max_age=30 * DAY, max_bytes=650, min_age=1 * DAY))
    assert [(r.name, str(why)) for r, why in got] == [("c", "age"), ("a", "size"), ("b", "size")]
    # min age wins over any budget: a folder of young records stays over its budget
    assert select([rec("x", 0.2, 10**9)], NOW, Budget(0, 1, DAY)) == []
    # no limits: nothing goes; an orphan image goes only after the grace hour
    assert select(records, NOW, Budget(0, 0, 0)) == []
    orphan = Record("o", ("o.png",), (0,), NOW - ORPHAN_GRACE / 2, 1, orphan=True)
    assert select([orphan], NOW, Budget(0, 0, 0)) == []
    assert select([orphan], NOW + ORPHAN_GRACE, Budget(0, 0, 0))[0][1] is Reason.ORPHAN


def make_outbox_pair(folder: Path, stem: str, age_days: float, now: float, size: int = 1000) -> None:
    (folder / f"{stem}.png").write_bytes(b"x" * size)
    (folder / f"{stem}.json").write_text(json.dumps({"output_file": f"{stem}.png"}))
    for name in (f"{stem}.png", f"{stem}.json"):
        os.utime(folder / name, (now - age_days * DAY, now - age_days * DAY))


def make_failed(folder: Path, name: str, age_days: float, now: float, size: int = 1000) -> None:
    record = folder / name
    (record / "sub").mkdir(parents=True)
    (record / "image.png").write_bytes(b"x" * size)
    (record / "sub" / "part").write_bytes(b"y")
    (record / "error.json").write_text('{"code": "mask_empty"}')
    os.utime(record, (now - age_days * DAY, now - age_days * DAY))


def test_records_go_whole_sidecar_first_and_the_budgets_hold(tmp_path):
    now = time.time()
    outbox, failed, archive = (tmp_path / n for n in ("outbox", "failed", "archive"))
    for f in (outbox, failed, archive):
        f.mkdir()
    for i in range(20):
        make_outbox_pair(outbox, f"job{i:02d}", age_days=20 - i, now=now)  # job00 oldest
        make_failed(failed, f"bad{i:02d}", age_days=20 - i, now=now)
    (outbox / "young.png").write_bytes(b"x")  # a publication under way: never touched
    plan = {"outbox": Budget(15 * DAY, 10 * 1100, DAY), "failed": Budget(0, 5 * 1100, DAY),
            "archive": Budget(DAY, 0, DAY)}
    removed = prune({"outbox": outbox, "failed": failed, "archive": archive}, plan, now)
    gone_outbox = [r.record.name for r in removed if r.folder == "outbox"]
    assert gone_outbox == [f"job{i:02d}" for i in range(10)]  # 5 by age (over 15 days), then the 5 oldest for size
    assert [str(r.reason) for r in removed if r.folder == "outbox"] == ["age"] * 5 + ["size"] * 5
    assert sorted(p.name for p in outbox.iterdir()) == sorted(
        [f"job{i:02d}.{e}" for i in range(10, 20) for e in ("png", "json")] + ["young.png"])
    assert sum(r.size for r in list_records(failed, "failed")) <= 5 * 1100
    assert sorted(p.name for p in failed.iterdir()) == [f"bad{i:02d}" for i in range(15, 20)]
    assert not [p for p in tmp_path.rglob(".inpaintd-trash-*")]


def test_a_sparse_input_grown_to_terabytes_counts_what_it_holds_and_removes_no_one_elses_records(tmp_path):
    """A drop user grows a claimed input to 8 TiB through a second handle (sparse): the job fails
    input_too_large and failed/ keeps the file. Counted by its length it would put failed/ over any
    budget and every other user's record would go as 'the oldest'."""
    now = time.time()
    failed = tmp_path / "failed"
    failed.mkdir()
    for i in range(10):
        make_failed(failed, f"bad{i:02d}", age_days=5 - i * 0.1, now=now)
    hostile = failed / "huge"
    hostile.mkdir()
    with open(hostile / "huge.png", "wb") as handle:
        handle.truncate(8 << 40)
    (hostile / "error.json").write_text('{"code": "input_too_large"}')
    sizes = {r.name: r.size for r in list_records(failed, "failed")}
    assert sizes["huge"] < 1 << 20, sizes
    plan = {"failed": Budget(0, 1 << 20, DAY)}
    removed = prune({"failed": failed}, plan, now)
    assert removed == []
    assert len(list(failed.iterdir())) == 11


PRUNER = r"""
import json, sys, time
from pathlib import Path
from inpaintd.store.retention import Budget, DAY, prune
folder, kind, max_bytes = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
print("start", flush=True)
removed = prune({kind: folder}, {kind: Budget(0, max_bytes, DAY)}, time.time())
print(json.dumps([r.record.name for r in removed]), flush=True)
"""


def _pruner(folder: Path, kind: str, max_bytes: int) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", PRUNER, str(folder), kind, str(max_bytes)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def test_a_kill_9_mid_prune_leaves_no_sidecar_without_image_and_no_half_failed_record(tmp_path):
    now = time.time()
    outbox, failed = tmp_path / "outbox", tmp_path / "failed"
    outbox.mkdir(), failed.mkdir()
    for i in range(1500):
        make_outbox_pair(outbox, f"j{i:04d}", age_days=2 + i / 1000, now=now, size=10)
    for i in range(300):
        make_failed(failed, f"f{i:03d}", age_days=2 + i / 1000, now=now, size=10)
    rng = random.Random(20)
    for _ in range(4):
        for folder, kind in ((outbox, "outbox"), (failed, "failed")):
            proc = _pruner(folder, kind, 0 if kind == "failed" else 10)
            assert proc.stdout is not None and proc.stdout.readline() == "start\n"
            time.sleep(rng.uniform(0.0, 0.15))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        names = {p.name for p in outbox.iterdir()}
        assert all(n.replace(".json", ".png") in names for n in names if n.endswith(".json")), "sidecar without image"
        for record in failed.iterdir():
            if not record.name.startswith("."):
                assert (record / "error.json").exists() and (record / "image.png").exists()
    # An orphan image a kill left (sidecar gone) goes once it is an hour old; the trash is cleared.
    for p in outbox.glob("*.png"):
        os.utime(p, (now - 2 * DAY, now - 2 * DAY))
    prune({"outbox": outbox}, {"outbox": Budget(0, 10 * 1000 + 1, DAY)}, now)
    left = list_records(outbox, "outbox")
    assert sum(r.size for r in left) <= 10 * 1000 + 1 and not any(r.orphan for r in left)
    assert not list(outbox.glob(".inpaintd-trash-*"))


def test_two_pruners_on_one_folder_remove_nothing_twice_or_wrongly(tmp_path):
    now = time.time()
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    for i in range(600):
        make_outbox_pair(outbox, f"j{i:04d}", age_days=2 + (600 - i) / 1000, now=now, size=10)  # j0000 oldest
    keep_bytes = 200 * (10 + len(json.dumps({"output_file": "j0000.png"})))
    procs = [_pruner(outbox, "outbox", keep_bytes) for _ in range(2)]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        results.append(json.loads(out.splitlines()[-1]))
    first, second = map(set, results)
    print("removed by each pruner:", len(first), len(second))
    assert not first & second, "a record removed twice"
    assert sorted(first | second) == [f"j{i:04d}" for i in range(400)]  # exactly the 400 oldest
    assert sorted(p.name for p in outbox.glob("*.json")) == [f"j{i:04d}.json" for i in range(400, 600)]


def test_a_simulated_season_stays_under_budget_and_removes_nothing_unrequested(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("simulate_year", Path(__file__).parents[1] / "scripts/simulate_year.py")
    sim = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules["simulate_year"] = sim  # its dataclass looks its module up
    spec.loader.exec_module(sim)
    # Budgets tight enough that the byte budgets, not only the ages, do the removing.
    plan = {"outbox": Budget(20 * DAY, 40 * 2504, DAY), "archive": Budget(10 * DAY, 30 * 3000, DAY),
            "failed": Budget(30 * DAY, 5 * 3000, DAY)}
    r = sim.simulate(tmp_path, days=40, per_day=10, plan=plan)
    assert r.unrequested == 0 and r.half_records == 0
    assert all(r.removed[k] > 0 for k in plan), r.removed
    assert all(r.peak_bytes[k] <= plan[k].max_bytes for k in plan), r.peak_bytes
