"""SIGHUP before `pgproxy run` handles it: held pending, never fatal.

Invariant: from the first import of `pgproxy run` until its reload handler
is installed, SIGHUP is ignored and blocked in the main thread. Linux keeps
a blocked signal pending even while its action is to ignore it (the kernel
cannot know the action it will have once unblocked), and execve keeps both
the mask and the pending set. So SIGHUPs sent while the command line starts,
while the serving process loads its first config, or while a supervisor
waits for its workers, wait as one pending signal: a standard signal does
not queue. `pgproxy.server.signals.open_reload_receiver` unblocks it once the
handler is installed, and the process then reloads once.

Ignoring as well as blocking keeps a thread that does not block SIGHUP from
dying of it. On a system that discards an ignored signal even while it is
blocked, which POSIX allows, an early SIGHUP is lost instead of delayed.

Child processes inherit the mask and the ignored action: the loader child
of the first load cannot be ended by a stray SIGHUP either.

This module imports only the standard library, because it runs before the
slow imports of the command line and of the serving process.
"""

from __future__ import annotations

import signal


def hold_sighup() -> None:
    """Block SIGHUP in this thread and ignore it, keeping one already pending.

    Setting the ignore action discards a pending SIGHUP, so a process that
    inherited the action (across exec from the command line) keeps it as it
    is.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)


def sighup_held() -> bool:
    """Return whether SIGHUP is blocked in this thread."""
    return signal.SIGHUP in signal.pthread_sigmask(signal.SIG_BLOCK, set())
