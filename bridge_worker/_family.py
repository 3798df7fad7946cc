"""Everything a worker starts ends with it, even a grandchild that calls ``setsid``.

Three layers, each catching what the one before misses:

- The worker leads its own process group, so ``killpg`` takes the children a handler starts.
- When the host gives it a cgroup v2 directory (``--cgroup``), the worker moves itself there
  before importing any handler: everything it ever starts stays in that cgroup, whatever it does
  with sessions and process groups, and writing ``1`` to ``cgroup.kill`` ends all of it at once.
- Without a cgroup, the worker is a child subreaper: a descendant whose parent exits is re-parented
  to the worker instead of to init, so the worker's process tree still holds every descendant,
  and :func:`kill_family` walks it. (A worker killed from outside cannot walk it: its orphans then
  go to init. The README says so.)

Linux only; elsewhere each step quietly does nothing. Standard library only.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import NoReturn

_PR_SET_CHILD_SUBREAPER = 36

#: This worker's cgroup directory, once it has moved itself there.
_cgroup: str | None = None


def enter_cgroup(path: str) -> bool:
    """Move this process into the cgroup directory ``path``; False (and a line on stderr) if
    that is not possible here."""
    global _cgroup
    try:
        with open(os.path.join(path, "cgroup.procs"), "w") as procs:
            procs.write(str(os.getpid()))
    except OSError as exc:
        sys.stderr.write(f"bridge_worker: cannot enter cgroup {path}: {exc}\n")
        return False
    _cgroup = path
    return True


def lead_own_group() -> None:
    """Lead a process group of its own, so that killing the group takes what handlers start and
    nothing else (a worker started by a shell or a service manager is in its starter's group)."""
    if os.getpgrp() != os.getpid():
        try:
            os.setpgid(0, 0)
        except OSError:  # a session leader cannot; it leads its group already
            pass


def become_subreaper() -> None:
    """Keep orphaned descendants in this worker's tree (see the module docstring)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def descendants(pid: int) -> list[int]:
    """The pids below ``pid`` in the process tree, parents before their children."""
    found: list[int] = []
    stack = [pid]
    while stack:
        parent = stack.pop()
        try:
            threads = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in threads:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    children = [int(c) for c in f.read().split()]
            except (OSError, ValueError):
                continue
            found.extend(children)
            stack.extend(children)
    return found


def kill_descendants() -> None:
    """SIGKILL every process below this one in the process tree."""
    # Twice: a process forking while the first pass runs leaves a child the second one finds.
    for _ in range(2):
        for pid in descendants(os.getpid()):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def kill_family() -> NoReturn:
    """SIGKILL everything this worker started, then the worker itself."""
    if _cgroup is not None:
        try:
            with open(os.path.join(_cgroup, "cgroup.kill"), "w") as kill:
                kill.write("1")  # ends this process too
        except OSError:
            pass
    kill_descendants()
    if os.getpgrp() == os.getpid():  # only a group this worker leads (never its starter's)
        try:
            os.killpg(0, signal.SIGKILL)
        except OSError:
            pass
    os._exit(1)
