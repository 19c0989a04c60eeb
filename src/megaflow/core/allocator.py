"""jemalloc under every MegaFlow process, where the machine has it.

Why: protobuf's Python runtime (upb) frees each message's memory with glibc's
`free` and calls `malloc_trim(0)` after every 10,000 frees (`upb_trim_allocfunc` in
protobuf's python/protobuf.c, still so in 7.36). A trim walks glibc's whole heap and
hands every free page back to the kernel (`madvise`), pages the process then faults
back in. With tens of thousands of tasks in flight the heap is GiBs and a trim
blocks the event loop for 10-50 ms, several times a second: at 30,000 tasks in
flight, 436 trims took 5.2 s of one run (worst 48 ms) and made the per-step p99
overhead 38-45 ms. Under jemalloc the same frees go to jemalloc, the trim finds
glibc's heap empty, and the p99 is ~5 ms (`docs/benchmarks.md`, Scale).

`preload()` re-executes the process (same PID, same arguments) with jemalloc in
`LD_PRELOAD`, before anything heavy is imported, and then takes `LD_PRELOAD` back
out of the environment, so that nothing the process starts (sandboxes, docker,
dockerd) inherits it. `MEGAFLOW_MALLOC=system` keeps glibc's allocator; without the
library (Debian: `libjemalloc2`) the process warns and goes on with glibc's. A
process whose command line would not do the same again (a program on stdin, an
interactive session, pytest) is not re-executed.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

ENV = "MEGAFLOW_MALLOC"
CHOICES = ("jemalloc", "system")
_PRELOADED = "_MEGAFLOW_MALLOC_PRELOADED"  # set across the re-exec: LD_PRELOAD before it


def loaded() -> bool:
    """Whether jemalloc is mapped into this process."""
    try:
        with open("/proc/self/maps") as f:
            return any("libjemalloc" in line for line in f)
    except OSError:
        return False


def current() -> str:
    """The allocator this process runs on, for reports."""
    return "jemalloc" if loaded() else "glibc malloc"


def choice() -> str:
    value = os.environ.get(ENV, "jemalloc").strip().lower() or "jemalloc"
    if value not in CHOICES:
        raise SystemExit(f"megaflow: {ENV}={value!r} is not one of {', '.join(CHOICES)}")
    return value


def library() -> str | None:
    """jemalloc's shared library as the dynamic linker finds it, or None."""
    return ctypes.util.find_library("jemalloc")


def preload() -> None:
    """Re-execute this process with jemalloc preloaded, unless it is already or can't be.

    Call it first thing in an entry point (`python -m megaflow.cli`, `megaflow`,
    `python -m bench`): `os.execve` replaces the process, so whatever ran before is
    done twice.
    """
    wanted = choice()
    if _PRELOADED in os.environ:  # the re-executed process: tidy up, never exec again
        before = os.environ.pop(_PRELOADED)
        if before:
            os.environ["LD_PRELOAD"] = before
        else:
            os.environ.pop("LD_PRELOAD", None)
        if not loaded():
            log.warning("jemalloc could not be preloaded; going on with glibc malloc")
        return
    if wanted == "system" or loaded() or not _restartable():
        return
    lib = library()
    if lib is None:
        log.warning("no jemalloc on this machine: glibc malloc (install libjemalloc2)")
        return
    before = os.environ.get("LD_PRELOAD", "")
    env = {**os.environ, _PRELOADED: before, "LD_PRELOAD": ":".join(filter(None, (lib, before)))}
    for stream in (sys.stdout, sys.stderr):  # None when the descriptor is closed
        with contextlib.suppress(OSError, ValueError, AttributeError):
            stream.flush()  # type: ignore[union-attr]
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError as error:
        log.warning("could not re-execute onto jemalloc (%s); going on with glibc malloc", error)


def _restartable() -> bool:
    """Whether executing this process again from its command line does the same thing:
    not a program read from stdin or typed in, not inside a test runner."""
    args = sys.orig_argv[1:]
    return (
        bool(args)
        and args[-1] != "-"
        and not sys.flags.interactive
        and ("pytest" not in sys.modules)
    )
