#!/usr/bin/env python3
"""A year of unattended running, simulated for retention (issue 20; RELIABILITY.md).

    .venv/bin/python scripts/simulate_year.py                       # 365 days, 40 jobs a day
    .venv/bin/python scripts/simulate_year.py --days 60 --per-day 10

Each simulated day writes that day's records the way the daemon files them (an outbox image
and its sidecar, an archive/NAME folder with the inputs, a failed/NAME folder with error.json
for one job in ten), dated with os.utime to that day, then runs one retention pass
(store/retention.prune) with `now` at the day's end. After every pass it checks: each folder
is within its byte budget (except records younger than the minimum age), nothing in it is
older than its maximum age, every removal was either past the age or the oldest of a folder
over its budget, nothing younger than the minimum age was removed, and every record is whole
(no sidecar without its image, no failed/NAME without error.json). Record sizes are scaled
down (1/1000 of a real job's) with the budgets, so a year fits in seconds on a laptop.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "daemon"))

from inpaintd.store.retention import DAY, Budget, list_records, prune  # noqa: E402

SCALE = 1000  # bytes here per kB of a real job
IMAGE, SIDECAR, INPUTS, ERROR = 2500, 4, 3000, 1  # kB of a typical job's files (a 12 MP JPEG)
# The defaults (core.config.RetentionConfig), with the byte budgets scaled like the records.
DEFAULTS = {
    "outbox": Budget(90 * DAY, 8 * 1024**3 // SCALE, DAY),
    "archive": Budget(30 * DAY, 4 * 1024**3 // SCALE, DAY),
    "failed": Budget(90 * DAY, 1024**3 // SCALE, DAY),
}


@dataclass
class Result:
    days: int
    jobs: int
    failures: int
    removed: dict[str, int]
    peak_bytes: dict[str, int]
    final_bytes: dict[str, int]
    budget_bytes: dict[str, int]
    unrequested: int
    half_records: int
    seconds: float


def _write(path: Path, size: int, when: float) -> None:
    path.write_bytes(b"x" * size)
    os.utime(path, (when, when))


def day_of_records(root: Path, day: int, per_day: int, when: float) -> int:
    failures = 0
    for j in range(per_day):
        name = f"d{day:03d}-{j:03d}"
        _write(root / "outbox" / f"{name}.jpg", IMAGE * SCALE // 1000, when)
        _write(root / "outbox" / f"{name}.json", SIDECAR * SCALE // 1000, when)
        if j % 10 == 9:
            record = root / "failed" / name
            record.mkdir()
            _write(record / "image.jpg", INPUTS * SCALE // 1000, when)
            (record / "error.json").write_text(json.dumps({"code": "mask_empty"}))
            os.utime(record / "error.json", (when, when))
            os.utime(record, (when, when))
            failures += 1
        else:
            record = root / "archive" / name
            record.mkdir()
            _write(record / f"{name}.jpg", INPUTS * SCALE // 1000, when)
            os.utime(record, (when, when))
    return failures


def check(root: Path, now: float, plan: dict[str, Budget], before: dict, removed: list) -> tuple[int, int]:
    """(unrequested removals, half records) after one pass."""
    unrequested = half = 0
    for kind, budget in plan.items():
        gone = [r for r in removed if r.folder == kind]
        records = list_records(root / kind, kind)
        total = sum(r.size for r in before[kind])
        gone_names = {g.record.name for g in gone}
        kept_oldest = min((r.mtime for r in before[kind] if r.name not in gone_names), default=float("inf"))
        for removal in gone:
            age = now - removal.record.mtime
            too_old = budget.max_age and age > budget.max_age
            # removed for size: the folder was over its budget and nothing older was kept
            for_size = budget.max_bytes and total > budget.max_bytes and kept_oldest >= removal.record.mtime
            if age < budget.min_age or not (too_old or for_size):
                unrequested += 1
        young = sum(r.size for r in records if now - r.mtime < budget.min_age)
        if budget.max_bytes and sum(r.size for r in records) > max(budget.max_bytes, young):
            raise AssertionError(f"{kind}: over its byte budget by more than what min_age protects")
        if budget.max_age and any(now - r.mtime > budget.max_age for r in records):
            raise AssertionError(f"{kind}: a record past its maximum age was kept")
        if kind == "outbox":
            names = {p.name for p in (root / kind).iterdir()}
            half += sum(1 for n in names if n.endswith(".json") and n[:-5] + ".jpg" not in names)
        if kind == "failed":
            half += sum(1 for r in records if not (root / kind / r.name / "error.json").exists())
    return unrequested, half


def simulate(root: Path, days: int = 365, per_day: int = 40, plan: dict[str, Budget] | None = None) -> Result:
    plan = plan or DEFAULTS
    for kind in plan:
        (root / kind).mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    start = time.time() - days * DAY
    jobs = failures = unrequested = half = 0
    removed = {k: 0 for k in plan}
    peak = {k: 0 for k in plan}
    for day in range(days):
        when = start + day * DAY + 3600
        failures += day_of_records(root, day, per_day, when)
        jobs += per_day
        now = start + (day + 1) * DAY
        before = {k: list_records(root / k, k) for k in plan}
        gone = prune({k: root / k for k in plan}, plan, now)
        for g in gone:
            removed[g.folder] += 1
        u, h = check(root, now, plan, before, gone)
        unrequested += u
        half += h
        for k in plan:
            peak[k] = max(peak[k], sum(r.size for r in list_records(root / k, k)))
    final = {k: sum(r.size for r in list_records(root / k, k)) for k in plan}
    return Result(days, jobs, failures, removed, peak, final, {k: b.max_bytes for k, b in plan.items()},
                  unrequested, half, time.monotonic() - began)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--per-day", type=int, default=40)
    args = parser.parse_args()
    import structlog

    structlog.configure(processors=[lambda *_: (_ for _ in ()).throw(structlog.DropEvent)])  # quiet
    with tempfile.TemporaryDirectory() as tmp:
        r = simulate(Path(tmp), args.days, args.per_day)
    gib = SCALE / 1024**3
    print(f"{r.days} days, {r.jobs} jobs ({r.failures} failed), {r.seconds:.1f} s")
    for k in r.removed:
        print(f"  {k}: removed {r.removed[k]}, peak {r.peak_bytes[k] * gib:.2f} GiB, end {r.final_bytes[k] * gib:.2f} GiB,"
              f" budget {r.budget_bytes[k] * gib:.2f} GiB (real sizes)")
    print(f"  unrequested removals: {r.unrequested}; half records: {r.half_records}")
    return 0 if r.unrequested == 0 and r.half_records == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
