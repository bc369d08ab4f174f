"""Forged state in fleet mode (issue 22, item 4), fast profile: ghost devices planted in a shared
state/ while real jobs arrive (tests/fleet_forgery.py builds the run and states the invariants;
scripts/soak.py --phases forgery runs the long profile)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fleet_forgery import FAST, Forgery, run_forgery

pytestmark = pytest.mark.slow


def test_forged_ghost_devices_are_refused_never_followed_and_never_block_the_real_jobs(
        tiny_model: Path, tmp_path: Path) -> None:
    run = run_forgery(tmp_path, tiny_model, FAST, log=print)
    print(json.dumps(run.figures, indent=2))
    assert run.figures["kinds"] == len(Forgery) and run.figures["real_jobs"] == FAST.jobs_per_round
    assert not run.violations, "\n".join(run.violations[:40])
