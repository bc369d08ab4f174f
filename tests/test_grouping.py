"""grouping: which inbox entries make which job, and when; the clock is a parameter."""

from __future__ import annotations

import unicodedata

from hypothesis import given, settings
from hypothesis import strategies as st
from inpaintd.intake.grouping import (
    AMBIGUOUS,
    INCOMPLETE,
    NOT_A_JOB,
    TOO_LARGE,
    UNSAFE,
    Hint,
    Kind,
    Rules,
    Seen,
    Stat,
    forget_writes,
    merge_hint,
    observe,
    plan,
    with_alpha,
)
from inpaintd.intake.names import job_key, junk_reason, parse_name

RULES = Rules(settle_seconds=2.0, incomplete_timeout=60.0)


def stat(path: str, kind: Kind = Kind.FILE, size: int = 10, mtime: int = 1, nlink: int = 1, inode: int = 0) -> Stat:
    return Stat(path, kind, size, mtime, nlink, inode or abs(hash(path)) % 10_000 + 1)


def seen_at(t: float, *paths: str, **kw) -> dict[str, Seen]:
    out = {}
    for p in paths:
        kind = Kind.DIR if p.endswith("/") else kw.get("kind", Kind.FILE)
        p = p.rstrip("/")
        out[p] = Seen(stat(p, kind, nlink=kw.get("nlink", 1)), first_seen=t, changed_at=t, alpha=kw.get("alpha"))
    return out


def test_a_complete_job_of_loose_files_is_ready_once_every_part_settled():
    seen = seen_at(0.0, "cat.png", "cat.mask.png", "cat.txt")
    assert plan(seen, 1.0, RULES).ready == ()
    (job,) = plan(seen, 2.0, RULES).ready
    assert (job.name, job.image, job.mask, job.prompt, job.folder) == ("cat", "cat.png", "cat.mask.png", "cat.txt", None)
    assert job.entries == ("cat.mask.png", "cat.png", "cat.txt")


def test_extensions_are_case_insensitive_and_stems_may_contain_dots():
    assert parse_name("Holiday.v2.JPG") == ("Holiday.v2", "image")
    assert parse_name("Holiday.v2.Mask.PNG") == ("Holiday.v2", "mask")
    assert parse_name("a.YAML") == ("a", "prompt")
    assert parse_name("notes.doc") is None
    assert parse_name("png") is None
    (job,) = plan(seen_at(0, "x.y.TIFF", "x.y.MASK.bmp"), 5, RULES).ready
    assert (job.image, job.mask) == ("x.y.TIFF", "x.y.MASK.bmp")


def test_a_part_written_later_restarts_the_settle_time_of_the_job():
    seen = seen_at(0.0, "cat.png", "cat.txt")
    seen.update(seen_at(9.0, "cat.mask.png"))
    assert plan(seen, 10.0, RULES).ready == ()
    assert len(plan(seen, 11.0, RULES).ready) == 1


def test_an_image_without_mask_is_probed_for_alpha_and_taken_when_it_has_one():
    seen = seen_at(0.0, "a.png")
    p = plan(seen, 5.0, RULES)
    assert p.probe == ("a.png",) and p.ready == ()
    assert plan(with_alpha(seen, "a.png", True), 5.0, RULES).ready[0].mask is None
    p = plan(with_alpha(seen, "a.png", False), 5.0, RULES)
    assert p.ready == () and "missing mask" in p.waiting[0].reason


def test_parts_arriving_apart_wait_and_complete_when_the_last_one_arrives():
    seen = with_alpha(seen_at(0.0, "dog.jpg"), "dog.jpg", False)
    assert "mask" in plan(seen, 50.0, RULES).waiting[0].reason
    seen.update(seen_at(55.0, "dog.mask.png"))
    (job,) = plan(seen, 57.0, RULES).ready
    assert job.arrived == 0.0


def test_an_incomplete_job_is_rejected_after_the_timeout_naming_the_missing_part():
    seen = with_alpha(seen_at(0.0, "dog.jpg"), "dog.jpg", False)
    (rej,) = plan(seen, 60.0, RULES).rejected
    assert rej.code == INCOMPLETE and rej.name == "dog" and rej.entries == ("dog.jpg",)
    assert "missing mask" in rej.message and "dog.mask." in rej.message
    assert rej.details["missing"] == ["mask"]
    (rej,) = plan(seen_at(0.0, "lone.mask.png"), 61.0, RULES).rejected
    assert "missing image" in rej.message


def test_a_prompt_file_is_required_only_when_the_rules_say_so():
    seen = seen_at(0.0, "a.png", "a.mask.png")
    assert len(plan(seen, 5.0, RULES).ready) == 1
    strict = Rules(2.0, 60.0, require_prompt=True)
    assert "prompt" in plan(seen, 5.0, strict).waiting[0].reason
    assert "a.txt" in plan(seen, 61.0, strict).rejected[0].message


def test_junk_left_by_clients_is_ignored_and_never_part_of_a_job():
    names = [".DS_Store", "._cat.png", "Thumbs.db", "desktop.ini", "~$doc.docx", "cat.png.part", "cat.png.partial",
             "x.TMP", "cat.png.filepart", "cat.png.crdownload", ".cat.png.Xa12Bc", ".hidden.png"]
    for n in names:
        assert junk_reason(n), n
    p = plan(seen_at(0.0, *names), 100.0, RULES)
    assert p.ready == () and p.rejected == () and p.waiting == ()
    assert sorted(n for n, _ in p.ignored) == sorted(names)
    assert junk_reason("cat.png") is None and junk_reason("part.png") is None


def test_entries_no_job_uses_wait_then_go_to_failed_as_not_a_job():
    """Issue 22: nothing sits in the inbox for ever without a record. An unknown file type is
    failed after incomplete_timeout; client debris (a paused upload looks the same) after the
    longer abandoned_timeout; inpaintd's own names never."""
    rules = Rules(settle_seconds=2.0, incomplete_timeout=60.0, abandoned_timeout=600.0)
    seen = seen_at(0.0, "readme.md", "photo.heic", "c.png.part", ".DS_Store", "..", ".inpaintd-share",
                   "._a.png", "~$doc.docx")
    early = plan(seen, 59.0, rules)
    assert not early.rejected and len(early.ignored) == len(seen)
    p = plan(seen, 60.0, rules)
    assert {r.entries for r in p.rejected} == {("readme.md",), ("photo.heic",)}
    assert all(r.code == NOT_A_JOB and r.code == "not_a_job" for r in p.rejected)
    late = plan(seen, 600.0, rules)
    names = {r.entries[0]: r.name for r in late.rejected}
    assert names == {"readme.md": "readme.md", "photo.heic": "photo.heic", "c.png.part": "c.png.part",
                     ".DS_Store": "DS_Store", "..": "unnamed", "._a.png": "_a.png", "~$doc.docx": "~$doc.docx"}
    assert [n for n, _ in late.ignored] == [".inpaintd-share"]
    # Written to again: the clock starts over.
    seen["c.png.part"] = Seen(stat("c.png.part"), first_seen=0.0, changed_at=500.0)
    assert "c.png.part" in {n for n, _ in plan(seen, 600.0, rules).ignored}


def test_two_images_with_one_stem_reject_the_job_as_ambiguous():
    (rej,) = plan(seen_at(0.0, "a.png", "a.jpg", "a.mask.png"), 5.0, RULES).rejected
    assert rej.code == AMBIGUOUS and "a.jpg, a.png" in rej.message
    assert rej.entries == ("a.jpg", "a.mask.png", "a.png")
    (rej,) = plan(seen_at(0.0, "a.png", "a.mask.png", "a.txt", "a.yaml"), 5.0, RULES).rejected
    assert rej.code == AMBIGUOUS and "prompt" in rej.message


def test_a_job_folder_is_a_job_and_clashes_with_loose_files_of_the_same_name():
    seen = seen_at(0.0, "job1/", "job1/Image.PNG", "job1/mask.png", "job1/job.yaml", "job1/.DS_Store")
    (job,) = plan(seen, 3.0, RULES).ready
    assert job.folder == "job1" and job.entries == ("job1",)
    assert (job.image, job.mask, job.prompt) == ("job1/Image.PNG", "job1/mask.png", "job1/job.yaml")
    seen.update(seen_at(0.0, "job1.png"))
    (rej,) = plan(seen, 3.0, RULES).rejected
    assert rej.code == AMBIGUOUS and rej.entries == ("job1", "job1.png")


def test_an_empty_job_folder_waits_then_fails_as_incomplete():
    seen = seen_at(0.0, "j/")
    assert plan(seen, 3.0, RULES).waiting[0].name == "j"
    (rej,) = plan(seen, 60.0, RULES).rejected
    assert rej.code == INCOMPLETE and "j/image." in rej.message


def test_symlinks_fifos_and_hardlinks_make_the_job_unsafe():
    for kw in ({"kind": Kind.SYMLINK}, {"kind": Kind.SPECIAL}, {"nlink": 2}):
        seen = seen_at(0.0, "a.mask.png")
        seen.update(seen_at(0.0, "a.png", **kw))
        (rej,) = plan(seen, 5.0, RULES).rejected
        assert rej.code == UNSAFE and rej.entries == ("a.mask.png", "a.png"), kw
    seen = seen_at(0.0, "f/", "f/image.png", "f/mask.png")
    seen.update(seen_at(0.0, "f/mask.png", kind=Kind.SYMLINK))
    (rej,) = plan(seen, 5.0, RULES).rejected
    assert rej.code == UNSAFE and rej.entries == ("f",)


def test_names_with_control_characters_or_undecodable_bytes_are_unsafe():
    (rej,) = plan(seen_at(0.0, "a\nb.png", "a\nb.mask.png"), 5.0, RULES).rejected
    assert rej.code == UNSAFE
    bad = b"caf\xe9".decode("utf-8", "surrogateescape")
    (rej,) = plan(seen_at(0.0, f"{bad}.png", f"{bad}.mask.png"), 5.0, RULES).rejected
    assert rej.code == UNSAFE and "UTF-8" in rej.message


def test_a_file_over_max_input_bytes_fails_the_job_from_its_size_before_any_probe():
    rules = Rules(2.0, 60.0, max_input_bytes=1000)
    seen = {p: Seen(stat(p, size=size), first_seen=0.0, changed_at=0.0)
            for p, size in (("big.bmp", 1001), ("big.txt", 5), ("ok.png", 1000), ("ok.mask.png", 10))}
    p = plan(seen, 5.0, rules)
    (rej,) = p.rejected
    assert rej.code == TOO_LARGE and rej.name == "big" and rej.entries == ("big.bmp", "big.txt")
    assert rej.details["entries"] == {"big.bmp": 1001} and "limits.max_input_bytes" in rej.message
    assert p.probe == () and [j.name for j in p.ready] == ["ok"]  # big.bmp (no mask) was never probed
    assert plan(seen, 5.0, RULES).probe == ("big.bmp",)  # no limit: the usual path


def test_ready_jobs_come_out_in_arrival_order():
    seen = seen_at(5.0, "b.png", "b.mask.png")
    seen.update(seen_at(1.0, "c.png", "c.mask.png"))
    seen.update(seen_at(3.0, "a.png", "a.mask.png"))
    assert [j.name for j in plan(seen, 10.0, RULES).ready] == ["c", "a", "b"]


def test_jobs_first_seen_in_the_same_look_come_out_in_the_order_they_were_written():
    seen = {}
    for name, ctime in (("a", 30), ("b", 10), ("c", 20)):
        for path in (f"{name}.png", f"{name}.mask.png"):
            st_ = Stat(path, Kind.FILE, 10, 1, 1, abs(hash(path)) % 10_000 + 1, ctime_ns=ctime)
            seen[path] = Seen(st_, first_seen=1.0, changed_at=1.0)  # one rescan saw them all
    assert [j.name for j in plan(seen, 10.0, RULES).ready] == ["b", "c", "a"]


# ---------------------------------------------------------------- observe


def test_observe_restarts_the_settle_time_when_size_or_mtime_changes():
    s0 = observe({}, [stat("a.png", size=1)], {}, now=0.0)
    s1 = observe(s0, [stat("a.png", size=1)], {}, now=1.5)
    assert s1["a.png"].changed_at == 0.0
    s2 = observe(s1, [stat("a.png", size=2)], {}, now=1.9)
    assert s2["a.png"].changed_at == 1.9 and s2["a.png"].first_seen == 0.0
    assert observe(s2, [], {}, now=2.0) == {}


def test_an_open_writer_holds_a_file_back_until_it_closes():
    s = observe({}, [stat("a.png")], {"a.png": Hint.WRITE}, now=0.0)
    s = observe(s, [stat("a.png")], {}, now=10.0)
    assert s["a.png"].writing and not plan(s, 10.0, RULES).probe
    s = observe(s, [stat("a.png")], {"a.png": Hint.CLOSE}, now=11.0)
    assert not s["a.png"].writing
    assert plan(s, 12.9, RULES).probe == () and plan(s, 13.0, RULES).probe == ("a.png",)


def test_a_lost_close_event_delays_a_file_but_never_strands_it():
    s = observe({}, [stat("a.png")], {"a.png": Hint.WRITE}, now=0.0)
    assert plan(s, 59.0, RULES).probe == ()
    assert plan(s, 60.0, RULES).probe == ("a.png",)
    assert plan(forget_writes(s), 2.0, RULES).probe == ("a.png",)


def test_a_file_renamed_over_an_open_one_is_a_new_file():
    s = observe({}, [stat("a.png", inode=1)], {"a.png": Hint.WRITE}, now=0.0)
    s = observe(s, [stat("a.png", inode=2)], {"a.png": Hint.CHANGE}, now=1.0)
    assert not s["a.png"].writing and s["a.png"].changed_at == 1.0


def test_a_changed_image_must_be_probed_again():
    s = with_alpha(observe({}, [stat("a.png", size=1)], {}, 0.0), "a.png", True)
    assert observe(s, [stat("a.png", size=1)], {}, 1.0)["a.png"].alpha is True
    assert observe(s, [stat("a.png", size=2)], {}, 1.0)["a.png"].alpha is None


def merged(*hints: Hint) -> Hint | None:
    out = None
    for hint in hints:
        out = merge_hint(out, hint)
    return out


def test_an_attribute_change_never_hides_a_close_or_a_write():
    assert merged(Hint.WRITE, Hint.CLOSE, Hint.CHANGE) is Hint.CLOSE  # scp -p: times set after close
    assert merged(Hint.WRITE, Hint.CHANGE) is Hint.WRITE  # smbd: create, set attributes, hold open
    assert merged(Hint.CLOSE, Hint.WRITE) is Hint.WRITE  # reopened for writing
    assert merged(Hint.CHANGE) is Hint.CHANGE and merged(Hint.CHANGE, Hint.CLOSE) is Hint.CLOSE


def test_times_set_after_the_close_within_one_look_leave_the_file_closed():
    s = observe({}, [stat("a.png")], {"a.png": Hint.WRITE}, now=0.0)
    s = observe(s, [stat("a.png", mtime=7)], {"a.png": merged(Hint.CLOSE, Hint.CHANGE)}, now=1.0)
    assert not s["a.png"].writing
    assert plan(s, 3.0, RULES).probe == ("a.png",)


def test_a_file_created_and_held_open_empty_is_not_taken_however_long_it_pauses():
    s = observe({}, [stat("a.png", size=0)], {"a.png": merged(Hint.WRITE, Hint.CHANGE)}, now=0.0)
    assert s["a.png"].writing
    assert plan(s, 30.0, RULES).probe == ()
    # Lost events do not release an empty file still open (its first byte may be on its way) ...
    assert plan(forget_writes(s), 30.0, RULES).probe == ()
    # ... but nothing waits forever: quiet for incomplete_timeout, it is taken (and fails as empty).
    assert plan(forget_writes(s), 60.0, RULES).probe == ("a.png",)
    s = observe(s, [stat("a.png", size=500, mtime=2)], {"a.png": merged(Hint.WRITE, Hint.CLOSE)}, now=31.0)
    assert plan(s, 33.0, RULES).probe == ("a.png",)


# ---------------------------------------------------------------- properties

NAMES = st.sampled_from(
    ["a.png", "a.jpg", "a.mask.png", "a.txt", "a.yaml", "b.webp", "b.mask.PNG", "b.json", ".DS_Store",
     "c.png.part", "._a.png", "d.bmp", "d.mask.bmp", "e/", "e/image.png", "e/mask.png", "e/job.json",
     "e/.hidden", "notes.doc", "a/", "a/image.jpg"]
)
ENTRY = st.tuples(NAMES, st.floats(0, 100), st.sampled_from(list(Kind)), st.integers(1, 2), st.booleans(),
                  st.booleans())


@settings(max_examples=300, deadline=None)
@given(st.lists(ENTRY, max_size=12), st.floats(0, 300), st.booleans())
def test_every_entry_lands_in_exactly_one_place_and_only_settled_safe_jobs_are_ready(entries, now, require_prompt):
    rules = Rules(2.0, 60.0, require_prompt)
    seen: dict[str, Seen] = {}
    for name, t, kind, nlink, writing, alpha in entries:
        if name.endswith("/"):
            kind = Kind.DIR
        elif kind is Kind.DIR:
            kind = Kind.FILE
        path = name.rstrip("/")
        if "/" in path and path.split("/")[0] + "/" not in [e[0] for e in entries]:
            continue
        seen[path] = Seen(stat(path, kind, nlink=nlink), first_seen=min(t, now), changed_at=min(t, now),
                          writing=writing, alpha=alpha)
    p = plan(seen, now, rules)
    top = {path for path in seen if "/" not in path}
    placed = [e for j in p.ready for e in j.entries] + [e for r in p.rejected for e in r.entries] + \
             [e for w in p.waiting for e in w.entries] + [n for n, _ in p.ignored if "/" not in n]
    assert sorted(placed) == sorted(top)
    for job in p.ready:
        parts = [job.image, job.mask, job.prompt]
        for part in filter(None, parts):
            s = seen[part]
            assert s.stat.kind is Kind.FILE and s.stat.nlink == 1
            assert now - s.changed_at >= (60.0 if s.writing else 2.0)
            assert junk_reason(part.rsplit("/", 1)[-1]) is None
        if job.mask is None:
            assert seen[job.image].alpha is True
        if require_prompt:
            assert job.prompt is not None
    assert plan(dict(reversed(list(seen.items()))), now, rules) == p


@settings(max_examples=300, deadline=None)
@given(st.lists(ENTRY, max_size=12), st.booleans())
def test_left_long_enough_every_entry_is_taken_or_recorded(entries, require_prompt):
    """Issue 22: whatever was dropped, once everything has been quiet for the longest timeout
    (and the alpha probe has answered), no top-level entry is left only waiting or ignored."""
    rules = Rules(2.0, 60.0, abandoned_timeout=600.0, require_prompt=require_prompt)
    seen: dict[str, Seen] = {}
    for name, t, kind, nlink, writing, alpha in entries:
        kind = Kind.DIR if name.endswith("/") else (Kind.FILE if kind is Kind.DIR else kind)
        path = name.rstrip("/")
        if "/" in path and path.split("/")[0] + "/" not in [e[0] for e in entries]:
            continue
        seen[path] = Seen(stat(path, kind, nlink=nlink), first_seen=t, changed_at=t, writing=writing, alpha=alpha)
    p = plan(seen, 100.0 + 600.0, rules)
    taken = {e for j in p.ready for e in j.entries} | {e for r in p.rejected for e in r.entries}
    assert taken == {path for path in seen if "/" not in path}, (p.waiting, p.ignored)
    for r in p.rejected:
        assert not r.name.startswith(".") and r.name not in ("", "..")


# --------------------------------------------------------------------------- case and normalisation


# Letters whose case mapping round-trips through casefold (Turkish dotless i does not, by design
# of Unicode: "ı".upper() is "I", whose casefold is "i"), plus precomposed letters with a
# decomposed form, the German sharp s ("STRASSE"/"straße") and final sigma.
_STEM_CHARS = "abcxyzABCXYZ019 _-éÉüÜñÑçÇåÅøØœŒßσςΣ"
stems = st.text(alphabet=_STEM_CHARS, min_size=1, max_size=12).filter(lambda s: s[0].isalnum())


@st.composite
def spelling(draw: st.DrawFn, stem: str) -> str:
    """One client's spelling of `stem`: each letter in some case, the whole in NFC or NFD."""
    chars = [draw(st.sampled_from([c, c.upper(), c.lower(), c.casefold()])) for c in stem]
    return unicodedata.normalize(draw(st.sampled_from(["NFC", "NFD"])), "".join(chars))


def ext(draw: st.DrawFn, choices: tuple[str, ...]) -> str:
    e = draw(st.sampled_from(choices))
    return draw(st.sampled_from([e, e.upper(), e.capitalize()]))


@settings(max_examples=300)
@given(st.data(), stems)
def test_any_case_and_normalisation_of_one_jobs_parts_is_one_ready_job(data: st.DataObject, stem: str) -> None:
    image = f"{data.draw(spelling(stem))}.{ext(data.draw, ('png', 'jpg', 'webp', 'tif'))}"
    mask = f"{data.draw(spelling(stem))}.{data.draw(st.sampled_from(['mask', 'MASK', 'Mask']))}.{ext(data.draw, ('png', 'bmp'))}"
    prompt = f"{data.draw(spelling(stem))}.{ext(data.draw, ('txt', 'yaml', 'json'))}"
    result = plan(seen_at(0.0, image, mask, prompt), 5.0, Rules(2.0, 60.0, require_prompt=True))
    assert (result.rejected, result.waiting, result.ignored) == ((), (), ())
    (job,) = result.ready
    assert (job.image, job.mask, job.prompt) == (image, mask, prompt)  # the names on disk, untouched
    assert job.name == image.rpartition(".")[0]  # named after the image as its sender spelled it
    assert job.entries == tuple(sorted((image, mask, prompt)))


def test_macos_nfd_and_windows_nfc_parts_join():
    nfd, nfc = unicodedata.normalize("NFD", "café"), unicodedata.normalize("NFC", "café")
    assert nfd != nfc and job_key(nfd) == job_key(nfc)
    (job,) = plan(seen_at(0.0, f"{nfd}.png", f"{nfc}.mask.png", f"{nfc}.txt"), 5.0, RULES).ready
    assert job.name == nfd and job.image == f"{nfd}.png"
    (job,) = plan(seen_at(0.0, "Photo.png", "photo.mask.png", "PHOTO.txt"), 5.0, RULES).ready
    assert (job.name, job.mask, job.prompt) == ("Photo", "photo.mask.png", "PHOTO.txt")
    (job,) = plan(seen_at(0.0, "STRASSE.jpg", "straße.mask.png"), 5.0, RULES).ready
    assert job.name == "STRASSE"


def test_two_images_whose_names_differ_only_in_case_are_ambiguous_naming_both():
    (rej,) = plan(seen_at(0.0, "Same.png", "same.png", "same.mask.png"), 5.0, RULES).rejected
    assert rej.code == AMBIGUOUS
    assert "Same.png, same.png" in rej.message and "letter case or Unicode normalisation" in rej.message
    assert rej.entries == ("Same.png", "same.mask.png", "same.png") and rej.details["entries"] == ["Same.png", "same.png"]
    assert rej.name == "Same"  # the record folder: one of the images' own stems


def test_the_same_name_in_nfc_and_nfd_twice_is_ambiguous():
    nfd, nfc = unicodedata.normalize("NFD", "café.png"), unicodedata.normalize("NFC", "café.png")
    (rej,) = plan(seen_at(0.0, nfd, nfc, "café.mask.png"), 5.0, RULES).rejected
    assert rej.code == AMBIGUOUS and rej.details["entries"] == sorted([nfd, nfc])
    assert "Unicode normalisation" in rej.message


def test_folders_and_loose_files_differing_in_case_clash():
    (rej,) = plan(seen_at(0.0, "Job/", "Job/image.png", "Job/mask.png", "job.png"), 5.0, RULES).rejected
    assert rej.code == AMBIGUOUS and rej.entries == ("Job", "job.png")
    assert "job folder Job/ and loose files" in rej.message and "(job.png)" in rej.message
    (rej,) = plan(seen_at(0.0, "Job/", "Job/image.png", "JOB/", "JOB/image.png"), 5.0, RULES).rejected
    assert rej.code == AMBIGUOUS and "more than one job folder" in rej.message and "JOB/, Job/" in rej.message


def test_unrelated_names_stay_apart():
    result = plan(seen_at(0.0, "a.png", "a.mask.png", "b.png", "b.mask.png", "å.png", "å.mask.png"), 5.0, RULES)
    assert sorted(j.name for j in result.ready) == ["a", "b", "å"]


@settings(max_examples=300, deadline=None)
@given(st.lists(ENTRY, min_size=1, max_size=12), st.data())
def test_a_part_taken_away_is_activity_in_its_job_and_holds_the_rest_back(entries, data):
    """Another daemon on the inbox claims a job part by part, or rolls back a claim that lost a
    part: the look that sees a part gone never rejects or takes what is left of that job (the
    chaos run once recorded one drop twice that way)."""
    seen: dict[str, Seen] = {}
    for name, t, kind, nlink, writing, alpha in entries:
        if "/" in name.rstrip("/"):
            continue
        path = name.rstrip("/")
        seen[path] = Seen(stat(path, Kind.DIR if name.endswith("/") else Kind.FILE, nlink=nlink), first_seen=t,
                          changed_at=t, writing=False, alpha=alpha)
    if not seen:
        return
    gone = data.draw(st.sampled_from(sorted(seen)))
    now = 1000.0  # every entry long past settle and incomplete timeouts
    after = observe(seen, [s.stat for p, s in seen.items() if p != gone], {}, now)
    parsed = parse_name(gone)
    key = job_key(parsed[0] if parsed else gone)
    p = plan(after, now, RULES)
    for job in p.ready:
        assert job_key(job.name) != key, (gone, job)
    for rejected in p.rejected:
        assert all(job_key((parse_name(e) or (e, ""))[0]) != key for e in rejected.entries), (gone, rejected)
    # Held back as fresh activity (settle, then the incomplete timeout), never for ever.
    assert not plan(after, now + RULES.incomplete_timeout, RULES).waiting
