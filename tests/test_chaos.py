"""The chaos test of issue 10 (fast profile): live daemons, random drops, kills and faults.

tests/chaos.py builds the run and states the invariants; scripts/soak.py runs the long profile
and writes the figures into RELIABILITY.md. This test fails with every violation listed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from chaos import FAST, run_chaos

pytestmark = pytest.mark.slow


def test_no_drop_kill_or_fault_gets_past_its_own_job(tiny_model: Path, tmp_path: Path) -> None:
    run = run_chaos(tmp_path, tiny_model, FAST, log=print)
    report = run.report
    assert report is not None
    print(json.dumps(report.figures, indent=2, ensure_ascii=False))
    assert report.figures["drops"] >= FAST.drops // 2
    assert report.figures["good"] > 0 and report.figures["hostile"] > 0
    # Issue 22's classes were drawn: writes through a kept handle after a claim, and the name
    # whose NAME ... NAME-9999 are taken in the outbox, failed/ and archive/.
    assert sum(report.figures["held_open_writes_after_claim"].values()) > 0
    assert report.figures["exhausted_name_drops"] == FAST.exhausted and report.figures["taken_names_made"] == 30_000
    assert not report.violations, "\n".join(report.violations[:40])
