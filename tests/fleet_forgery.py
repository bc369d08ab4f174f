"""Forged state in fleet mode (issue 22, item 4): ghost devices planted in a shared `state/`.

A drop user who can write the share's `state/` folder (a misconfigured share; the README says
how to prevent it) can plant `state/<ghost>/` folders that look like a dead device: an old
heartbeat and claims whose `job.json` is hostile. A fleet-mode daemon on a local "share" (the
marker made by `init_share`, as `inpaintd init-share` does; no sshfs: forgery is about what the
daemon reads back, not about the network) watches them go silent and judges them dead; a seeded
generator plants them while real jobs keep arriving:

- a claim named `../../pwned` (or absolute, or `..`), whose files point outside its claim or
  the share (`../../../outside/secret.png`, an absolute path);
- a claim whose `inputs/` is a symlink to a folder outside the share, one whose entry is a
  symlink to a file outside, a claim folder that is itself a symlink, a `claimed/` folder that
  is a symlink, a device folder that is a symlink;
- a FIFO or a symlink as the heartbeat, a FIFO as `status.json` or as `job.json`;
- an oversized `job.json`, one nested 100,000 deep, wrong types, a job id that is not its folder's;
- and, as the control, a well-formed claim of a really dead device (inputs inside the share),
  which must still be taken over and finished.

Then `check` states the invariants: nothing outside the share changed (not a byte, not a name),
no byte of a file outside the share (nor its hash) is in any record, the daemon never blocked
(its own heartbeat kept beating, every real job was done once, `inpaintd status` answered),
each forged claim was refused with a `fleet.claim_refused` log event or never judged at all, and
stays where it was planted (never taken over), the daemon's own claims are empty at the end, and
no temp file is left in a user-visible folder.

Shared by tests/test_fleet_forgery.py (fast profile) and scripts/soak.py (phase forgery).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from daemon_harness import (
    FAST_SETTINGS,
    Daemon,
    Dirs,
    drop_job,
    image_bytes,
    mask_bytes,
    merged,
    outcomes,
)
from PIL import Image, PngImagePlugin

LEASE = 2.0
HEARTBEAT = 0.5  # a third of the lease at most (config check)
SETTINGS = {
    "watch": {"settle_seconds": 0.3, "rescan_interval": 2, "incomplete_timeout": 30},
    "fleet": {"enabled": True, "device_id": "dev0", "lease_seconds": LEASE, "heartbeat_seconds": HEARTBEAT},
    "limits": {"max_input_bytes": 4 << 20},
}


class Forgery(str, Enum):
    """One kind of ghost device folder, and what must become of it."""

    NAME_ESCAPE = "name-escape"  # job.json name ../../pwned, /abs, ..
    FILES_OUTSIDE = "files-outside"  # files.image / files.prompt leave the claim
    INPUTS_SYMLINK = "inputs-symlink"  # inputs/ -> a folder outside the share
    ENTRY_SYMLINK = "entry-symlink"  # inputs/<image> -> a file outside (well-formed record)
    CLAIM_SYMLINK = "claim-symlink"  # claimed/<job id> -> a claim folder outside
    CLAIMED_SYMLINK = "claimed-symlink"  # claimed/ -> a folder of claims outside
    DEVICE_SYMLINK = "device-symlink"  # state/<ghost> -> a device folder outside
    FIFO_HEARTBEAT = "fifo-heartbeat"
    SYMLINK_HEARTBEAT = "symlink-heartbeat"  # -> a valid heartbeat outside
    FIFO_STATUS = "fifo-status"  # status.json is a FIFO (inpaintd status, metrics read it)
    FIFO_JOB_JSON = "fifo-job-json"
    SYMLINK_JOB_JSON = "symlink-job-json"  # -> a valid job.json outside
    OVERSIZED_JSON = "oversized-json"
    DEEP_JSON = "deep-json"
    WRONG_TYPES = "wrong-types"
    ID_MISMATCH = "id-mismatch"
    WELL_FORMED = "well-formed"  # the control: a dead device's real claim, taken over and done


class Fate(str, Enum):
    """What the contract says becomes of a ghost's claim."""

    REFUSED = "refused"  # judged dead, its claim refused with fleet.claim_refused, left in place
    IGNORED = "ignored"  # never judged (no readable heartbeat, or not a device folder): left in place
    UNSAFE = "unsafe"  # a well-formed record whose entry is a link: taken over, failed job_unsafe, link filed
    DONE = "done"  # the control: taken over and published


FATES: dict[Forgery, Fate] = {
    Forgery.NAME_ESCAPE: Fate.REFUSED, Forgery.FILES_OUTSIDE: Fate.REFUSED, Forgery.INPUTS_SYMLINK: Fate.REFUSED,
    Forgery.ENTRY_SYMLINK: Fate.UNSAFE, Forgery.CLAIM_SYMLINK: Fate.REFUSED, Forgery.CLAIMED_SYMLINK: Fate.REFUSED,
    Forgery.DEVICE_SYMLINK: Fate.IGNORED, Forgery.FIFO_HEARTBEAT: Fate.IGNORED,
    Forgery.SYMLINK_HEARTBEAT: Fate.IGNORED, Forgery.FIFO_STATUS: Fate.DONE, Forgery.FIFO_JOB_JSON: Fate.REFUSED,
    Forgery.SYMLINK_JOB_JSON: Fate.REFUSED, Forgery.OVERSIZED_JSON: Fate.REFUSED, Forgery.DEEP_JSON: Fate.REFUSED,
    Forgery.WRONG_TYPES: Fate.REFUSED, Forgery.ID_MISMATCH: Fate.REFUSED, Forgery.WELL_FORMED: Fate.DONE,
}


@dataclass(frozen=True)
class Profile:
    seed: int = 1
    rounds: int = 1  # each round plants every kind once, in a random order, while jobs arrive
    jobs_per_round: int = 6
    settle_leases: float = 4.0  # after the last plant: long enough to judge every ghost dead and try it


FAST = Profile()
LONG = Profile(seed=7, rounds=12, jobs_per_round=20)


@dataclass
class Ghost:
    """One planted device folder."""

    device: str
    kind: Forgery
    job_id: str
    name: str  # the job name its record gives (for DONE/UNSAFE: the outcome's name)

    @property
    def fate(self) -> Fate:
        return FATES[self.kind]


@dataclass
class Run:
    profile: Profile
    root: Path
    share: Path
    outside: Path
    daemon: Daemon
    secret: bytes
    ghosts: list[Ghost] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)
    outside_before: dict[str, str] = field(default_factory=dict)
    root_before: set[str] = field(default_factory=set)
    beat_before: int = 0
    status_seconds: float | None = None
    status_error: str | None = None
    violations: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- the world


def _png_with_secret(secret: bytes) -> bytes:
    """A valid image whose bytes hold the secret (a tEXt chunk): a record holding it copied it."""
    info = PngImagePlugin.PngInfo()
    info.add_text("secret", secret.decode())
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def _job_id(rng: random.Random) -> str:
    return f"20261204T{rng.randrange(240000):06d}Z-{rng.randrange(1 << 32):08x}"


def _record(job_id: str, name: str, entries: list[str], files: dict[str, str | None]) -> dict[str, Any]:
    """A claim record as store/spool.py writes it."""
    return {"schema": "inpaintd.claim/1", "job_id": job_id, "name": name, "folder": None, "entries": entries,
            "files": files, "arrived": 1764806400.0, "claimed": 1764806401.0, "attempts": 0, "owner": -1,
            "state": "claimed"}


def _heartbeat(path: Path, device: str) -> None:
    """An old heartbeat: a valid beat that never changes again, its mtime a day back."""
    payload = json.dumps({"device": device, "host": "elsewhere", "pid": 1, "token": "0" * 16, "beat": 7}).encode()
    path.write_bytes(payload.ljust(512))
    old = time.time() - 86400
    os.utime(path, (old, old))


def make_outside(outside: Path, secret: bytes) -> None:
    """What lies next to the share: secrets, a valid heartbeat and valid claims to point links at."""
    outside.mkdir()
    (outside / "secret.txt").write_bytes(secret + b"\n")
    (outside / "secret.png").write_bytes(_png_with_secret(secret))
    (outside / "secret.mask.png").write_bytes(mask_bytes((64, 64), (20, 20, 40, 40)))
    _heartbeat(outside / "heartbeat", "outside")
    device = outside / "device"
    (device / "claimed").mkdir(parents=True)
    _heartbeat(device / "heartbeat", "device")
    (outside / "claims").mkdir()


def _outside_claim(outside: Path, job_id: str, name: str) -> Path:
    """A well-formed claim folder outside the share, holding the secret files."""
    folder = outside / "claims" / job_id
    (folder / "inputs").mkdir(parents=True)
    for entry in ("secret.png", "secret.mask.png", "secret.txt"):
        os.link(outside / entry, folder / "inputs" / entry)
    record = _record(job_id, name, ["secret.png", "secret.mask.png", "secret.txt"],
                     {"image": "secret.png", "mask": "secret.mask.png", "prompt": "secret.txt"})
    (folder / "job.json").write_text(json.dumps(record))
    return folder


def plant(rng: random.Random, run: Run, kind: Forgery, index: int) -> Ghost:
    """One ghost device of `kind` under the share's state/."""
    state, outside = run.share / "state", run.outside
    device = f"ghost{index:03d}-{kind.value}"
    job_id = _job_id(rng)
    name = f"ghostjob{index:03d}"
    ghost = Ghost(device, kind, job_id, name)
    folder = state / device
    if kind is Forgery.DEVICE_SYMLINK:
        target = outside / "device"
        _outside_claim(outside, job_id, name)
        os.symlink(outside / "claims" / job_id, target / "claimed" / job_id)
        os.symlink(target, folder)
        return ghost
    folder.mkdir()
    claimed = folder / "claimed"
    if kind is Forgery.CLAIMED_SYMLINK:
        _outside_claim(outside, job_id, name)
        os.symlink(outside / "claims", claimed)
    else:
        claimed.mkdir()
    if kind is Forgery.FIFO_HEARTBEAT:
        os.mkfifo(folder / "heartbeat")
    elif kind is Forgery.SYMLINK_HEARTBEAT:
        os.symlink(outside / "heartbeat", folder / "heartbeat")
    else:
        _heartbeat(folder / "heartbeat", device)
    if kind is Forgery.FIFO_STATUS:
        os.mkfifo(folder / "status.json")
    elif kind is Forgery.WRONG_TYPES:  # its status.json too: inpaintd status shows it as unknown
        status = {"state": ["busy"], "current": rng.choice(["pwned", ["x"], {"name": {"x": 1}}]), "queue_length": "9"}
        (folder / "status.json").write_text(json.dumps(status))
    if kind in (Forgery.CLAIMED_SYMLINK,):
        return ghost
    claim = claimed / job_id
    if kind is Forgery.CLAIM_SYMLINK:
        os.symlink(_outside_claim(outside, job_id, name), claim)
        return ghost
    inputs = claim / "inputs"
    entries = [f"{name}.png", f"{name}.mask.png", f"{name}.txt"]
    files: dict[str, str | None] = {"image": entries[0], "mask": entries[1], "prompt": entries[2]}
    if kind is Forgery.INPUTS_SYMLINK:
        claim.mkdir()
        target = _outside_claim(outside, f"{job_id}-in", name) / "inputs"
        os.symlink(target, inputs)
        entries = ["secret.png", "secret.mask.png", "secret.txt"]
        files = {"image": "secret.png", "mask": "secret.mask.png", "prompt": "secret.txt"}
    else:
        inputs.mkdir(parents=True)
        (inputs / entries[0]).write_bytes(image_bytes((64, 64), "PNG", seed=index))
        (inputs / entries[1]).write_bytes(mask_bytes((64, 64), (20, 20, 40, 40)))
        (inputs / entries[2]).write_bytes(b"a ghost's house")
    if kind is Forgery.ENTRY_SYMLINK:
        (inputs / entries[0]).unlink()
        os.symlink(outside / "secret.png", inputs / entries[0])
        (inputs / entries[2]).unlink()
        os.symlink(outside / "secret.txt", inputs / entries[2])
    record = _record(job_id, name, entries, files)
    if kind is Forgery.NAME_ESCAPE:
        record["name"] = rng.choice(["../../pwned", "../../../pwned", "/tmp/pwned", "..", "a/../../pwned"])
    elif kind is Forgery.FILES_OUTSIDE:
        target = rng.choice(["../../../../outside/secret.{}", f"{outside}/secret.{{}}", "inputs/../../../x.{}"])
        record["files"] = {"image": target.format("png"), "mask": entries[1], "prompt": target.format("txt")}
    elif kind is Forgery.WRONG_TYPES:
        key, value = rng.choice([("attempts", "many"), ("entries", {"a": 1}), ("files", [entries[0]]),
                                 ("arrived", "yesterday"), ("state", "pwned"), ("schema", 2), ("owner", "root"),
                                 ("folder", "../.."), ("job_id", None)])
        record[key] = value
    elif kind is Forgery.ID_MISMATCH:
        record["job_id"] = _job_id(rng)
    data = json.dumps(record).encode()
    if kind is Forgery.OVERSIZED_JSON:
        record["pad"] = "x" * rng.choice([(1 << 20) + 1, 8 << 20])
        data = json.dumps(record).encode()
    elif kind is Forgery.DEEP_JSON:
        data = b"[" * 100_000 + b"]" * 100_000
    if kind is Forgery.FIFO_JOB_JSON:
        os.mkfifo(claim / "job.json")
    elif kind is Forgery.SYMLINK_JOB_JSON:
        outside_claim = _outside_claim(outside, f"{job_id}-j", name)
        os.symlink(outside_claim / "job.json", claim / "job.json")
    else:
        (claim / "job.json").write_bytes(data)
    return ghost


def _snapshot(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, str]:
    """Every path under root (links not followed) -> its type and content hash or link target."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skip]
        for name in dirnames + filenames:
            path = here / name
            st = os.lstat(path)
            rel = str(path.relative_to(root))
            if os.path.islink(path):
                out[rel] = "link:" + os.readlink(path)
            elif os.path.isfile(path):
                out[rel] = f"file:{st.st_size}:{hashlib.sha256(path.read_bytes()).hexdigest()}"
            else:
                out[rel] = f"mode:{st.st_mode:o}"
    return out


def _beat(share: Path, device: str) -> int:
    try:
        return int(json.loads((share / "state" / device / "heartbeat").read_bytes().rstrip(b" \0"))["beat"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


# ---------------------------------------------------------------------------- the run


def run_forgery(root: Path, model: Path, profile: Profile = FAST, log: Callable[[str], None] = lambda s: None) -> Run:
    from inpaintd.store.fleet import init_share

    rng = random.Random(profile.seed)
    share, outside = root / "share", root / "outside"
    share.mkdir(parents=True)
    init_share(share)
    secret = f"SECRET-{rng.randrange(1 << 64):016x}".encode()
    make_outside(outside, secret)
    dirs = Dirs.make(root / "local", model, merged(FAST_SETTINGS, SETTINGS))
    dirs.rewrite_config({"paths": {k: str(share / k) for k in ("inbox", "outbox", "failed", "archive", "state")},
                         "metrics": {"textfile": str(root / "local" / "inpaintd.prom"), "interval_seconds": 0.5}})
    dirs.outbox, dirs.failed, dirs.archive, dirs.inbox = (share / k for k in ("outbox", "failed", "archive", "inbox"))
    dirs.state = share / "state" / "dev0"
    run = Run(profile, root, share, outside, Daemon(dirs), secret)
    run.root_before = set(os.listdir(root))
    run.daemon.start(timeout=180)
    run.beat_before = _beat(share, "dev0")
    started = time.monotonic()
    try:
        index = 0
        for round_ in range(profile.rounds):
            kinds = list(Forgery)
            rng.shuffle(kinds)
            jobs_at = sorted(rng.sample(range(len(kinds) + profile.jobs_per_round), profile.jobs_per_round))
            step = 0
            while kinds or jobs_at:
                if jobs_at and jobs_at[0] == step:
                    jobs_at.pop(0)
                    name = f"real{len(run.jobs):04d}"
                    drop_job(dirs.inbox, name, seed=len(run.jobs))
                    run.jobs.append(name)
                elif kinds:
                    run.ghosts.append(plant(rng, run, kinds.pop(), index))
                    index += 1
                step += 1
                time.sleep(rng.uniform(0.0, 0.3))
            log(f"forgery round {round_ + 1}/{profile.rounds}: {len(run.ghosts)} ghosts, {len(run.jobs)} jobs")
            if round_ == 0:
                run.outside_before = _snapshot(outside)  # every outside target exists from the first round on
        wanted = set(run.jobs) | {g.name for g in run.ghosts if g.fate in (Fate.DONE, Fate.UNSAFE)}
        deadline = time.monotonic() + max(profile.settle_leases * LEASE, 5.0)
        bound = time.monotonic() + 120.0
        while time.monotonic() < bound:
            found = outcomes(dirs)
            if wanted <= set(found) and time.monotonic() >= deadline:
                break
            if not run.daemon.alive():
                break
            time.sleep(0.25)
        _status(run)
        run.figures["seconds"] = round(time.monotonic() - started, 1)
        check(run)
    finally:
        if run.daemon.alive():
            code = run.daemon.stop(timeout=60)
            if code != 0:
                run.violations.append(f"the daemon exited {code} on SIGTERM:\n{run.daemon.log_tail()}")
        else:
            run.violations.append(f"the daemon died:\n{run.daemon.log_tail()}")
    return run


def _status(run: Run) -> None:
    """`inpaintd status --json` reads every device's status.json: a FIFO must not hang it."""
    started = time.monotonic()
    try:
        out = subprocess.run([sys.executable, "-m", "inpaintd", "status", "--json", "--config",
                              str(run.daemon.dirs.config)], capture_output=True, text=True, timeout=60,
                             env=run.daemon.env, check=False)
        if out.returncode != 0:
            run.status_error = out.stderr[-2000:]
        else:
            devices = {d["device"] for d in json.loads(out.stdout)["devices"]}
            if "dev0" not in devices:
                run.status_error = f"dev0 missing from {sorted(devices)}"
    except subprocess.TimeoutExpired:
        run.status_error = "inpaintd status did not answer within 60 s"
    run.status_seconds = round(time.monotonic() - started, 1)


# ---------------------------------------------------------------------------- invariants


def check(run: Run) -> None:
    v = run.violations
    share, daemon = run.share, run.daemon
    if not daemon.alive():
        v.append(f"the daemon is not alive:\n{daemon.log_tail()}")
    # Nothing outside the share changed, and nothing new appeared next to it (../../pwned).
    after = _snapshot(run.outside)
    changed = sorted(k for k in set(after) | set(run.outside_before) if after.get(k) != run.outside_before.get(k)
                     and k in run.outside_before)
    if changed:
        v.append(f"outside the share, changed or removed: {changed[:10]}")
    new_next_to_share = sorted(set(os.listdir(run.root)) - run.root_before)
    if new_next_to_share:
        v.append(f"written next to the share: {new_next_to_share}")
    # No byte of a file outside the share (nor its hash) in any record.
    # The secret files' hashes too (a sidecar names its inputs by hash); not the mask's, which
    # is the ordinary mask every job here uses.
    hashes = {hashlib.sha256((run.outside / n).read_bytes()).hexdigest().encode() for n in ("secret.png", "secret.txt")}
    leaked = []
    for dirpath, _dirs, filenames in os.walk(share):
        rel = Path(dirpath).relative_to(share).parts
        if len(rel) >= 2 and rel[0] == "state" and rel[1].startswith("ghost"):
            continue  # the ghosts' own folders: what was planted there stays there
        for name in filenames:
            path = Path(dirpath) / name
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            data = path.read_bytes()[: 16 << 20]
            if run.secret in data or any(h in data for h in hashes):
                leaked.append(str(path.relative_to(share)))
    if leaked:
        v.append(f"outside bytes (or their hash) in records: {leaked[:10]}")
    # Real jobs, and the control, done exactly once; UNSAFE ghosts failed job_unsafe.
    found = outcomes(daemon.dirs)
    for name in run.jobs:
        got = found.get(name, [])
        if [o.kind for o in got] != ["done"]:
            v.append(f"real job {name}: {[(o.kind, o.code) for o in got]}")
    events = daemon.events()
    refused = {(e.get("device"), e.get("claim")) for e in events if e.get("event") == "fleet.claim_refused"}
    refused_devices = {d for d, _ in refused}
    mine = share / "state" / "dev0" / "claimed"
    fates: dict[str, int] = {}
    for ghost in run.ghosts:
        fates[ghost.fate.value] = fates.get(ghost.fate.value, 0) + 1
        got = found.get(ghost.name, [])
        if ghost.fate is Fate.DONE and [o.kind for o in got] != ["done"]:
            v.append(f"{ghost.device}: its well-formed claim was not taken over and done: {[(o.kind, o.code) for o in got]}")
        elif ghost.fate is Fate.UNSAFE and [(o.kind, o.code) for o in got] != [("failed", "job_unsafe")]:
            v.append(f"{ghost.device}: its linked entry did not fail job_unsafe: {[(o.kind, o.code) for o in got]}")
        elif ghost.fate in (Fate.REFUSED, Fate.IGNORED):
            if got:
                v.append(f"{ghost.device} ({ghost.kind.value}): a forged claim was taken over: {[o.path for o in got]}")
            if os.path.lexists(mine / ghost.job_id):
                v.append(f"{ghost.device} ({ghost.kind.value}): its claim was renamed into this device's claims")
            planted = share / "state" / ghost.device / "claimed"
            if ghost.kind not in (Forgery.CLAIMED_SYMLINK, Forgery.DEVICE_SYMLINK) and not os.path.lexists(
                    planted / ghost.job_id):
                v.append(f"{ghost.device} ({ghost.kind.value}): its claim is gone from where it was planted")
        if ghost.fate is Fate.REFUSED and ghost.device not in refused_devices:
            v.append(f"{ghost.device} ({ghost.kind.value}): no fleet.claim_refused event")
        if ghost.fate is Fate.IGNORED and ghost.device in refused_devices:
            v.append(f"{ghost.device} ({ghost.kind.value}): judged, though it has no readable heartbeat")
    left = sorted(os.listdir(mine)) if mine.is_dir() else []
    if left:
        v.append(f"this device's claims are not empty at the end: {left}")
    for folder in ("outbox", "failed", "archive", "inbox"):
        hidden = [n for n in os.listdir(share / folder) if n.startswith(".")]
        if hidden:
            v.append(f"hidden or temp entries left in {folder}/: {hidden}")
    beats = _beat(share, "dev0") - run.beat_before
    expected = run.figures["seconds"] / HEARTBEAT
    if beats < expected / 3:
        v.append(f"this device beat {beats} times in {run.figures['seconds']} s (expected about {expected:.0f}): blocked")
    if run.status_error is not None:
        v.append(f"inpaintd status: {run.status_error}")
    run.figures.update({
        "seed": run.profile.seed, "rounds": run.profile.rounds, "ghosts": len(run.ghosts),
        "kinds": len({g.kind for g in run.ghosts}), "fates": dict(sorted(fates.items())), "real_jobs": len(run.jobs),
        "real_done": sum(1 for n in run.jobs if [o.kind for o in found.get(n, [])] == ["done"]),
        "refused_events": len(refused), "own_beats": beats, "status_seconds": run.status_seconds,
        "outside_paths_watched": len(run.outside_before), "violations": len(v),
    })


def main() -> int:  # pragma: no cover - for running one profile by hand
    import argparse
    import tempfile

    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--long", action="store_true")
    parser.add_argument("--seed", type=int)
    args = parser.parse_args()
    profile = LONG if args.long else FAST
    if args.seed is not None:
        from dataclasses import replace

        profile = replace(profile, seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="chaos22b-forgery-") as tmp:
        run = run_forgery(Path(tmp), Path(args.model), profile, log=print)
    print(json.dumps(run.figures, indent=2))
    for line in run.violations:
        print("VIOLATION:", line)
    return 1 if run.violations else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
