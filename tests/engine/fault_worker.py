"""``python fault_worker.py KILL_AT KILL_RANK upop-args...``: runs the ``upop`` CLI and SIGKILLs itself right after
training step KILL_AT (counted over all phases; after the optimizer step, before the Pruner's) on rank KILL_RANK, in
the first attempt only (TORCHELASTIC_RESTART_COUNT unset or 0). KILL_AT 0 never kills. With UPOP_TEST_SIGNAL=TERM
(or INT) that signal is sent instead of SIGKILL."""

from __future__ import annotations

import os
import signal
import sys

import torch

from upop.cli import main
from upop.engine import loop


def arm(kill_at: int, kill_rank: int) -> None:
    original = loop.backward_and_step
    count = 0

    def counted(*args, **kwargs):
        nonlocal count
        result = original(*args, **kwargs)
        count += 1
        first_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0
        if count == kill_at and int(os.environ.get("RANK", "0")) == kill_rank and first_attempt:
            os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("UPOP_TEST_SIGNAL", "KILL")))
        return result

    loop.backward_and_step = counted


if __name__ == "__main__":
    torch.set_num_threads(1)
    arm(int(sys.argv[1]), int(sys.argv[2]))
    sys.exit(main(sys.argv[3:]))
