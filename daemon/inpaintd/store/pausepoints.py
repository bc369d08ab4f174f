"""Named points of a job where the fleet tests freeze a device exactly (issue 19).

A device can be frozen anywhere (a VM pause, a long GC, SIGSTOP), and the fencing of
store/outbox.py must hold at each step. Polling a device's claim from outside and sending
SIGSTOP cannot land inside a window of a few milliseconds (between the image's link and the
sidecar's), so the daemon stops *itself* there: when `INPAINTD_TEST_PAUSE_FILE` names a file
and that file holds the name of the point being passed, the file is removed (one pause per
request) and the process sends itself SIGSTOP, every thread with it, as a freeze would. The
test resumes it with SIGCONT. Without the variable (every real run) `reached` returns at once.

Test-only by purpose, kept in the product because the point is to freeze the real code at its
real steps. No images, no torch. May import: nothing in inpaintd.
"""

from __future__ import annotations

import enum
import os
import signal

PAUSE_FILE_VARIABLE = "INPAINTD_TEST_PAUSE_FILE"
_PAUSE_FILE = os.environ.get(PAUSE_FILE_VARIABLE) or None


class PausePoint(str, enum.Enum):
    PAINTING = "painting"                                   # after the first denoising step
    AFTER_OWNERSHIP_CHECK = "after the ownership check"      # the claim was ours; nothing staged yet
    BETWEEN_IMAGE_AND_SIDECAR = "between image and sidecar"  # S4 recorded, S5 not made
    AFTER_SIDECAR = "after the sidecar"                      # S5 made, the claim not yet published
    ARCHIVING = "archiving"                                  # the record folder built, not renamed out


def reached(point: PausePoint) -> None:
    if _PAUSE_FILE is None:
        return
    try:
        with open(_PAUSE_FILE, encoding="utf-8") as handle:
            wanted = handle.read(200).strip()
    except OSError:
        return
    if wanted != point.value:
        return
    try:
        os.unlink(_PAUSE_FILE)
    except FileNotFoundError:
        return  # another thread took this pause
    os.kill(os.getpid(), signal.SIGSTOP)
