"""Child processes that do not outlive the process that started them.

A supervisor that SIGKILLs ``pdgate up`` (SIGTERM, then SIGKILL a second later, as impatient ones
do) gives it no chance to stop its engines; without help they would run on as orphans holding
their ports. On Linux a child can ask the kernel for a signal when its parent dies
(``prctl(PR_SET_PDEATHSIG)``): :func:`die_with_parent` gives ``subprocess.Popen`` the
``preexec_fn`` that asks for SIGTERM (the engine then stops its own children as it does on any
SIGTERM). The kernel sends it when the *thread* that forked the child ends, so children must be
started from the main thread or the event loop's, never from a worker thread. Elsewhere than
Linux it is None (no such request).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when this process dies (Linux), else None.

    Everything it needs is resolved here, in the parent: between fork and exec the child runs only
    the ``prctl`` call and one ``getppid`` (a parent that died before the call means SIGTERM now).
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()
    term = int(signal.SIGTERM)

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, term, 0, 0, 0)
        if os.getppid() != parent:  # the parent is already gone: nobody will stop this child
            os.kill(os.getpid(), term)

    return arm
