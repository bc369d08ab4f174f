"""Which inbox entries form which job, and when a job is ready. Pure: no files, no clock.

The intake (service) scans the inbox into `Stat`s, folds them with the watcher's hints into
`Seen` records with `observe`, and asks `plan` what to do. `now` is always a parameter, so
every timing rule here is tested without sleeping.

Inbox contract:
- loose files sharing a stem NAME: image `NAME.<ext>`, mask `NAME.mask.<ext>`, prompt
  `NAME.txt|NAME.yaml|NAME.json` (extensions case-insensitive);
- or a folder `NAME/` holding `image.<ext>`, `mask.<ext>` and `prompt.txt|job.yaml|job.json`.
Stems are compared by `job_key`: Unicode-normalised and case-folded, because one job's parts
often come from different clients (macOS scp writes NFD `café.png`, Windows SMB NFC
`café.mask.png`; a camera writes `IMG_1.JPG`, a script `img_1.mask.png`). Names on disk are
never changed; the job is named after its image's own stem (else its folder's, else its first
part's). Two images (masks, prompts) whose stems have one key are ambiguous, never guessed.
A file counts once it has been unchanged for `settle_seconds` and, where the observer reports
writes (inotify), once its writer closed it (`merge_hint`: an attribute change never hides a
write or a close). A job is complete with an image, a mask (unless the image has an alpha
channel) and a prompt file (when `require_prompt`). A job missing a part for
`incomplete_timeout` since its last activity is rejected, naming the part. A job with a file
over `max_input_bytes` is rejected as soon as it settled, from its size alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Iterable, Mapping

from ..core.errors import Code
from ..core.jobs import name_problem
from .names import (
    DERIVED_SUFFIX_BYTES,
    job_key,
    junk_reason,
    parse_folder_member,
    parse_name,
)

# Codes for rejections decided here.
INCOMPLETE = Code.JOB_INCOMPLETE
UNSAFE = Code.JOB_UNSAFE
AMBIGUOUS = Code.JOB_AMBIGUOUS
TOO_LARGE = Code.INPUT_TOO_LARGE
NAME_TOO_LONG = Code.NAME_TOO_LONG
NOT_A_JOB = Code.NOT_A_JOB
# inpaintd's own names (temp files, the fleet's share marker): never moved as debris.
OWN_PREFIX = ".inpaintd-"


class Kind(str, Enum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    SPECIAL = "special"  # FIFO, socket, device


class Hint(str, Enum):
    """What the watcher saw happen to a path since the last observation."""

    WRITE = "write"  # created or written: a writer may still have it open
    CLOSE = "close"  # a writer closed it after writing
    CHANGE = "change"  # renamed in, deleted, metadata changed


@dataclass(frozen=True)
class Stat:
    """One inbox entry as a scan saw it (lstat: links are never followed)."""

    path: str  # "NAME.png" or, inside a job folder, "NAME/image.png"
    kind: Kind
    size: int = 0
    mtime_ns: int = 0
    nlink: int = 1
    inode: int = 0
    ctime_ns: int = 0  # inode change time: orders jobs first seen in the same look (not settling)

    @property
    def signature(self) -> tuple[object, ...]:
        return (self.kind, self.size, self.mtime_ns, self.nlink, self.inode)


@dataclass(frozen=True)
class Seen:
    """An entry followed over time."""

    stat: Stat
    first_seen: float
    changed_at: float  # last time its stat changed or the watcher reported a write
    writing: bool = False  # opened for writing and not closed yet (inotify only)
    alpha: bool | None = None  # images: has an alpha channel; None = not probed yet


@dataclass(frozen=True)
class Rules:
    settle_seconds: float
    incomplete_timeout: float
    require_prompt: bool = False
    max_input_bytes: int | None = None  # a bigger file fails its job before anything reads it
    name_max: int = 255  # bytes in one file name on the daemon's filesystems (pathconf NAME_MAX)
    abandoned_timeout: float = 86400.0  # client debris left this long goes to failed/ (not_a_job)


@dataclass(frozen=True)
class JobGroup:
    """A job ready to claim. Paths are relative to the inbox."""

    name: str
    image: str
    mask: str | None
    prompt: str | None
    entries: tuple[str, ...]  # top-level entries to move: the files, or the folder
    folder: str | None
    arrived: float  # when its first part was seen
    # Earliest ctime of its files: after an overflow rescan every job is first seen in the same
    # look, and this keeps them in the order they were written rather than by name.
    first_ctime_ns: int = 0


@dataclass(frozen=True)
class Rejected:
    """A job (or a stray part) that goes to failed/ without processing."""

    name: str
    code: str
    message: str
    entries: tuple[str, ...]
    details: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Waiting:
    name: str
    reason: str
    entries: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    ready: tuple[JobGroup, ...] = ()
    rejected: tuple[Rejected, ...] = ()
    waiting: tuple[Waiting, ...] = ()
    ignored: tuple[tuple[str, str], ...] = ()  # (path, why)
    probe: tuple[str, ...] = ()  # settled images without a mask whose alpha must be read


# --------------------------------------------------------------------------- names


# --------------------------------------------------------------------------- observing


def observe(
    seen: Mapping[str, Seen],
    scan: Iterable[Stat],
    hints: Mapping[str, Hint],
    now: float,
) -> dict[str, Seen]:
    """Fold a fresh scan and the watcher's hints into what we know; vanished entries drop out."""
    result: dict[str, Seen] = {}
    for stat in scan:
        hint = hints.get(stat.path)
        prev = seen.get(stat.path)
        if prev is None:
            result[stat.path] = Seen(stat, first_seen=now, changed_at=now, writing=hint is Hint.WRITE)
            continue
        changed = prev.stat.signature != stat.signature
        writing = prev.writing
        if hint is Hint.WRITE:
            writing = True
        elif hint is Hint.CLOSE:
            writing = False
        if hint is not None and stat.kind is not Kind.DIR:
            changed = True  # a reported write or close restarts the settle time
        if changed and prev.stat.inode != stat.inode:
            writing = hint is Hint.WRITE  # a new file under this name (renamed in)
        result[stat.path] = Seen(
            stat,
            first_seen=prev.first_seen,
            changed_at=now if changed else prev.changed_at,
            writing=writing,
            alpha=prev.alpha if not changed else None,
        )
    # A part that vanished is activity in its job: another daemon on this inbox is claiming it
    # part by part (or rolling a lost race back). Judged now, the parts left would look like an
    # incomplete job of their own and be recorded apart from the part that comes back.
    gone = {_group_key(path) for path in seen if "/" not in path and path not in result}
    if gone:
        for path, s in result.items():
            if "/" not in path and _group_key(path) in gone:
                result[path] = replace(s, changed_at=now)
    return result


def _group_key(name: str) -> str:
    """The job a top-level entry would join in plan (a folder's or an unknown file's own name)."""
    parsed = parse_name(name)
    return job_key(parsed[0]) if parsed is not None else job_key(name)


def merge_hint(previous: Hint | None, new: Hint) -> Hint:
    """Two watcher signals for one path between two looks: the one the next look acts on.

    WRITE and CLOSE say whether a writer has the file open; CHANGE (attributes, a rename, a
    delete) says nothing about that, so it never replaces either: close-then-attrib (scp -p,
    rsync --inplace and smbd set the times after closing) stays closed instead of "still being
    written", and create-then-attrib (smbd creates the file, sets its attributes and holds it
    open at 0 bytes while the client sends) stays open instead of settling empty. Between WRITE
    and CLOSE the later one wins: a file written, closed and opened again is open.
    """
    if new is Hint.CHANGE and previous is not None:
        return previous
    return new


def forget_writes(seen: Mapping[str, Seen]) -> dict[str, Seen]:
    """After lost events (queue overflow) no close can be trusted to come: rely on settling.

    Except for an empty file still open for writing: an upload looks like that until its first
    byte (smbd holds the file open at 0 bytes while the client sends), and settling it would
    claim it mid-upload. It keeps waiting for its close, at most incomplete_timeout (is_settled).
    """
    return {p: s if s.writing and s.stat.size == 0 else replace(s, writing=False) for p, s in seen.items()}


def with_alpha(seen: Mapping[str, Seen], path: str, alpha: bool) -> dict[str, Seen]:
    out = dict(seen)
    if path in out:
        out[path] = replace(out[path], alpha=alpha)
    return out


def is_settled(s: Seen, now: float, rules: Rules) -> bool:
    quiet = now - s.changed_at
    if s.writing:
        # An open writer holds the file back, however long it pauses (an empty file too: an
        # upload that has not sent its first byte). A close event that never came (lost
        # events, a client holding its handle) must not hold it back forever, so a file
        # quiet for the whole timeout counts.
        return quiet >= rules.incomplete_timeout
    return quiet >= rules.settle_seconds


# --------------------------------------------------------------------------- planning


@dataclass
class _Group:
    name: str  # the first part's stem until _name_group picks the job's name
    folder: str | None = None
    entries: list[str] = field(default_factory=list)  # top-level entries
    members: list[str] = field(default_factory=list)  # every observed path that belongs
    roles: dict[str, list[str]] = field(default_factory=lambda: {"image": [], "mask": [], "prompt": []})
    unsafe: dict[str, str] = field(default_factory=dict)
    conflict: list[str] = field(default_factory=list)


def plan(seen: Mapping[str, Seen], now: float, rules: Rules) -> Plan:
    """Decide, for every entry, whether it is ignored, waiting, ready or rejected."""
    groups: dict[str, _Group] = {}
    ignored: list[tuple[str, str]] = []
    rejected: list[Rejected] = []
    top = sorted(p for p in seen if "/" not in p)
    children: dict[str, list[str]] = {}
    for path in seen:
        if "/" in path:
            parent, _, child = path.partition("/")
            children.setdefault(parent, []).append(path)

    for name in top:
        stat = seen[name].stat
        junk = junk_reason(name)
        if junk is not None:
            if name.startswith(OWN_PREFIX) or not _left_behind(name, seen[name], junk, rules.abandoned_timeout, now,
                                                               rejected):
                ignored.append((name, junk))
            continue
        if stat.kind is Kind.DIR:
            group = groups.setdefault(job_key(name), _Group(name))
            if group.folder is not None or group.entries:
                group.conflict.append(name)
            group.folder = name
            group.entries.append(name)
            group.members.append(name)
            problem = name_problem(name)
            if problem:
                group.unsafe[name] = problem
            _add_folder_members(group, sorted(children.get(name, ())), seen, ignored)
            continue
        parsed = parse_name(name)
        if parsed is None:
            why = "not part of any job (unknown file type)"
            unsafe = _unsafe(name, stat)
            if not _left_behind(name, seen[name], unsafe or why, rules.incomplete_timeout, now, rejected,
                                UNSAFE if unsafe else NOT_A_JOB):
                ignored.append((name, why))
            continue
        stem, role = parsed
        group = groups.setdefault(job_key(stem), _Group(stem))
        if group.folder is not None:
            group.conflict.append(name)
        group.entries.append(name)
        group.members.append(name)
        group.roles[role].append(name)
        problem = _unsafe(name, stat) or name_problem(stem)
        if problem:
            group.unsafe[name] = problem

    ready: list[JobGroup] = []
    waiting: list[Waiting] = []
    probe: list[str] = []
    for group in groups.values():
        group.name = _job_name(group)
        _decide(group, seen, now, rules, ready, rejected, waiting, probe)
    ready.sort(key=lambda j: (j.arrived, j.first_ctime_ns, j.name))
    return Plan(
        ready=tuple(ready),
        rejected=tuple(sorted(rejected, key=lambda r: r.name)),
        waiting=tuple(sorted(waiting, key=lambda w: w.name)),
        ignored=tuple(sorted(ignored)),
        probe=tuple(sorted(probe)),
    )


def _left_behind(name: str, s: Seen, why: str, timeout: float, now: float, rejected: list[Rejected],
                 code: Code = NOT_A_JOB) -> bool:
    """An entry no job will use goes to failed/ once it has been left unchanged for `timeout`:
    nothing sits in the inbox for ever without a record. Its record is named after it without
    leading dots (a hidden record would be invisible, and `.inpaintd-*` names are inpaintd's own)."""
    if now - s.changed_at < timeout:  # an open writer too: a lost close must not hold it for ever
        return False
    record = name.lstrip(".") or "unnamed"
    if name_problem(record):
        record = "unnamed"  # the unsafe name is kept on the entry itself, inside the record
    rejected.append(Rejected(
        record, code,
        f"{name}: {why}, unchanged for {timeout:g} s; moved here so that nothing sits in the inbox for ever"
        + ("; a job needs NAME.<image>, NAME.mask.<image> and a prompt" if code is NOT_A_JOB else ""),
        (name,), {"entry": name, "reason": why, "after_seconds": timeout},
    ))
    return True


def oversize_message(sizes: Mapping[str, int], limit: int) -> str:
    """The sentence for files over limits.max_input_bytes ({path: bytes})."""
    files = ", ".join(f"{p} is {size:,} bytes" for p, size in sorted(sizes.items()))
    return f"input too large: {files}; the limit is {limit:,} bytes (limits.max_input_bytes); not read"


def _job_name(group: _Group) -> str:
    """The name outputs and records get: the image's own stem, else the folder's, else the first part's."""
    if group.folder is not None:
        return group.folder
    images = sorted(group.roles["image"])
    if images:
        parsed = parse_name(images[0])
        if parsed is not None:
            return parsed[0]
    return group.name


def _spelling_note(names: list[str]) -> str:
    """Why names that differ in spelling are one job's parts, when they do."""
    stems = {n.partition("/")[0] if "/" in n else (parse_name(n) or (n, ""))[0] for n in names}
    if len(stems) < 2:
        return ""
    return ("; their names differ only in letter case or Unicode normalisation, and stems are "
            "compared without either (one job per name, whichever client wrote it)")


def _unsafe(path: str, stat: Stat) -> str | None:
    if stat.kind is Kind.SYMLINK:
        return "is a symbolic link"
    if stat.kind is Kind.SPECIAL:
        return "is not a regular file (FIFO, socket or device)"
    if stat.kind is Kind.FILE and stat.nlink > 1:
        return "is a hard link to another file"
    return None


def _add_folder_members(
    group: _Group, paths: list[str], seen: Mapping[str, Seen], ignored: list[tuple[str, str]]
) -> None:
    for path in paths:
        child = path.partition("/")[2]
        stat = seen[path].stat
        junk = junk_reason(child)
        if junk is not None:
            ignored.append((path, junk))
            continue
        if stat.kind is Kind.DIR:
            ignored.append((path, "folder inside a job folder"))
            continue
        role = parse_folder_member(child)
        problem = _unsafe(path, stat)
        if problem:
            group.members.append(path)
            group.unsafe[path] = problem
            continue
        if role is None:
            ignored.append((path, "not part of the job (unknown file name in a job folder)"))
            continue
        group.members.append(path)
        group.roles[role].append(path)


def _decide(
    group: _Group,
    seen: Mapping[str, Seen],
    now: float,
    rules: Rules,
    ready: list[JobGroup],
    rejected: list[Rejected],
    waiting: list[Waiting],
    probe: list[str],
) -> None:
    entries = tuple(sorted(group.entries))
    members = [seen[p] for p in group.members]
    unsettled = [p for p in group.members if not is_settled(seen[p], now, rules)]
    if unsettled:
        waiting.append(Waiting(group.name, "settling: " + ", ".join(sorted(unsettled)), entries))
        return

    if group.unsafe:
        detail = "; ".join(f"{p} {why}" for p, why in sorted(group.unsafe.items()))
        rejected.append(
            Rejected(group.name, UNSAFE, f"unsafe inbox entry: {detail}", entries, {"entries": dict(group.unsafe)})
        )
        return

    name_bytes = len(group.name.encode("utf-8"))
    if name_bytes + DERIVED_SUFFIX_BYTES > rules.name_max:
        longest = rules.name_max - DERIVED_SUFFIX_BYTES
        rejected.append(
            Rejected(
                group.name,
                NAME_TOO_LONG,
                f"the job name is {name_bytes} bytes; names of at most {longest} bytes (UTF-8) leave room "
                f"for the output names derived from them (NAME-1234abcd.webp); rename and send again",
                entries,
                {"name_bytes": name_bytes, "max_name_bytes": longest},
            )
        )
        return

    if group.conflict:
        folders = sorted(e for e in entries if seen[e].stat.kind is Kind.DIR)
        if len(folders) > 1:
            message = f"more than one job folder for job {group.name}: {', '.join(f + '/' for f in folders)}; keep exactly one"
        else:
            message = (f"both a job folder {group.folder}/ and loose files named {group.folder}.* are present "
                       f"({', '.join(e for e in entries if e not in folders)}); send a job one way only")
        rejected.append(
            Rejected(
                group.name,
                AMBIGUOUS,
                message + _spelling_note(list(entries)),
                entries,
                {"entries": list(entries)},
            )
        )
        return

    for role, label in (("image", "images"), ("mask", "masks"), ("prompt", "prompt files")):
        if len(group.roles[role]) > 1:
            names = sorted(group.roles[role])
            rejected.append(
                Rejected(
                    group.name,
                    AMBIGUOUS,
                    f"more than one {role} for job {group.name}: {', '.join(names)}; keep exactly one"
                    + _spelling_note(names),
                    entries,
                    {"role": role, "entries": names},
                )
            )
            return

    if rules.max_input_bytes is not None:
        # Judged from the scan's sizes, before the alpha probe or the job reads a byte.
        sizes = {p: seen[p].stat.size for p in group.members if seen[p].stat.kind is Kind.FILE}
        big = {p: size for p, size in sorted(sizes.items()) if size > rules.max_input_bytes}
        if big:
            rejected.append(
                Rejected(
                    group.name, TOO_LARGE, oversize_message(big, rules.max_input_bytes), entries,
                    {"entries": big, "max_input_bytes": rules.max_input_bytes},
                )
            )
            return

    image = group.roles["image"][0] if group.roles["image"] else None
    mask = group.roles["mask"][0] if group.roles["mask"] else None
    prompt = group.roles["prompt"][0] if group.roles["prompt"] else None
    prefix = f"{group.folder}/" if group.folder is not None else f"{group.name}."
    missing: list[str] = []
    if image is None:
        missing.append(f"image ({prefix}{'image.' if group.folder is not None else ''}<png|jpg|webp|...>)")
    elif mask is None:
        alpha = seen[image].alpha
        if alpha is None:
            probe.append(image)
            waiting.append(Waiting(group.name, "checking the image for an alpha channel", entries))
            return
        if not alpha:
            missing.append(
                f"mask ({prefix}mask.<png|jpg|...>, or an image with an alpha channel)"
                if group.folder is not None
                else f"mask ({group.name}.mask.<png|jpg|...>, or an image with an alpha channel)"
            )
    if prompt is None and rules.require_prompt:
        missing.append(
            f"prompt ({prefix}prompt.txt or job.yaml/job.json)"
            if group.folder is not None
            else f"prompt ({group.name}.txt, .yaml or .json)"
        )

    if missing:
        last_activity = max(s.changed_at for s in members)
        if now - last_activity >= rules.incomplete_timeout:
            rejected.append(
                Rejected(
                    group.name,
                    INCOMPLETE,
                    f"job {group.name} incomplete after {rules.incomplete_timeout:g} s: missing "
                    + "; ".join(missing),
                    entries,
                    {"missing": [m.split(" ", 1)[0] for m in missing], "present": sorted(group.members)},
                )
            )
        else:
            waiting.append(Waiting(group.name, "missing " + "; ".join(missing), entries))
        return

    assert image is not None
    ready.append(
        JobGroup(
            name=group.name,
            image=image,
            mask=mask,
            prompt=prompt,
            entries=entries,
            folder=group.folder,
            arrived=min(s.first_seen for s in members),
            first_ctime_ns=min(s.stat.ctime_ns for s in members),
        )
    )
