"""vLLM plugin: vLLM's engine processes end with the predictor, however it ends.

vLLM runs its engine core in a child process. A predictor that stops normally shuts
it down; one killed by SIGKILL (the kernel's OOM killer, a pod's hard stop) cannot,
and the engine process (the model's weights and KV cache, hundreds of MB and more)
and the multiprocessing resource tracker it holds open would keep running under init,
one more set with every crash.

`VllmEngine.start` marks the processes it starts with LIFELINE_VARIABLE. In each of
them this plugin starts a thread that watches the parent process: when the process
is reparented (its parent has ended, whatever the cause), it kills itself. Its own
children, watching it in turn, follow. Polling the parent's id, unlike
PR_SET_PDEATHSIG, is indifferent to which of the parent's threads started the child.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger("loraforge.predictor.vllm")

LIFELINE_VARIABLE = "LORAFORGE_ENGINE_LIFELINE"
POLL_SECONDS = 0.5

_watching = False


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        threading.Event().wait(POLL_SECONDS)
    # Not logging: the predictor that would read it has gone, and a lock held by another
    # thread of this process must not delay the exit.
    os.kill(os.getpid(), signal.SIGKILL)


def register() -> None:
    """Entry point of the plugin: in a process a predictor's engine started, starts the watch."""
    global _watching
    if _watching or not os.environ.get(LIFELINE_VARIABLE):
        return
    import multiprocessing

    if multiprocessing.parent_process() is None:
        return  # the predictor itself (or a process it did not start through vLLM)
    _watching = True
    threading.Thread(
        target=_watch, args=(os.getppid(),), name="loraforge-lifeline", daemon=True
    ).start()
    log.debug("process %d ends with its parent %d", os.getpid(), os.getppid())
