"""The one exception type for problems a user can cause and fix (and its one kind that a retry
fixes: storage out of reach), the redaction that keeps credentials written into a URI
(`https://user:secret@host`) out of every line we print or store, an exception's first line
for the one-line reports, the one line for a write the disk refused, and the one rule for a
number of seconds a user sets."""

import errno
import math
import os
import re

_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


class JobError(Exception):
    """A bad input (URI, archive, folder, setting). The CLI prints it as one line, exit 2.

    The message names the problem and the fix; it never carries a traceback or a secret.
    """

    exit_code = 2


class StorageUnavailable(JobError):
    """Storage that stayed out of reach (unreachable, timing out, throttling, failing with 5xx)
    for the whole retry budget. Nothing is lost, and the same command resumes once it is back,
    so the exit status asks for a retry: 69, sysexits' EX_UNAVAILABLE, which the manifests count
    against the Job's retries instead of failing it as they do 2."""

    exit_code = 69


def strip_userinfo(value):
    """`https://user:secret@host/x` → `https://host/x`, anywhere in a string; other values pass."""
    return _USERINFO.sub(r"\1", value) if isinstance(value, str) else value


def first_line(error: BaseException, limit: int, fallback: str | None = None) -> str:
    """An exception's first line, cut to `limit` characters: for one-line reports."""
    return (str(error).splitlines() or [fallback or type(error).__name__])[0][:limit]


def check_seconds(seconds: float, what: str) -> float:
    """`seconds` if it is a number of seconds as every such setting takes it (an option, a
    CNN_JOB_*_S variable, W&B's WANDB_INIT_TIMEOUT): a finite number, 0 or more, where 0 is
    zero seconds (no interval, no retrying, no waiting); else one line naming `what` (the
    option or variable with its value) and what it takes."""
    if not (math.isfinite(seconds) and seconds >= 0):
        raise JobError(f"{what} is not a number of seconds: it takes a finite number, 0 or more")
    return seconds


def seconds_from_env(name: str, default: float) -> float:
    """The seconds environment variable `name` holds (check_seconds' rule); unset or empty (a
    ConfigMap's placeholder), `default`."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    return check_seconds(seconds, f"{name}={text!r}")


def reason(error: BaseException, limit: int = 120) -> str:
    """Why a system call failed, in the system's words ("No space left on device", "Read-only
    file system"); for an error without them, its first line."""
    return getattr(error, "strerror", None) or first_line(error, limit)


# A disk with no room for the file (full, over quota, past the largest file it takes).
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def cannot_write(what: str, error: BaseException, option: str, kept: str = "",
                 then: str = "") -> JobError:
    """The one line for a write the disk refused: what could not be written (naming where), why
    (`reason`), what that leaves (`kept`), and what to do: on a full disk, free space there or
    pass another `option`; on one that refuses (read-only, no permission), a writable one."""
    fix = (f"free space there, or pass another {option}" if getattr(error, "errno", None) in DISK_FULL
           else f"pass a writable {option}")
    return JobError(f"cannot write {what} ({reason(error)})" + (f"; {kept}" if kept else "")
                    + f": {fix}" + (f", {then}" if then else ""))
