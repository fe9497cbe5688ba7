"""Loaded by every Python process started with this directory on ``PYTHONPATH`` (vLLM on CPU).

vLLM's CPU attention kernel uses Intel AMX tiles and assumes the process was granted the AMX
tile-data state; oneDNN only asks the kernel for it lazily, for large matrix products. An engine
whose first forward pass is tiny (a decode step after a KV transfer, a 1-3 token prompt) then
dies with SIGILL. Asking once at start-up (``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``)
fixes it; on CPUs without AMX the call fails harmlessly.
"""

import ctypes
import platform

_SYS_ARCH_PRCTL = 158
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18

if platform.machine() == "x86_64":
    try:
        ctypes.CDLL(None, use_errno=True).syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA)
    except (OSError, AttributeError):
        pass
