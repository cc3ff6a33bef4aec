"""`accelerate launch`, as the Makefile runs every stage, without a traceback of its own on Ctrl-C.

Ctrl-C reaches the whole foreground process group: the stage stops and says how to resume (run_main), while the
launcher, waiting on it, would add a KeyboardInterrupt traceback under that message. Here the launcher lets the
signal pass while its stage runs, and exits as the stage does; before the stage has started (accelerate takes
seconds to import) Ctrl-C ends the launcher at once, as a signal does (raising KeyboardInterrupt there could be
swallowed by a library's import). The handler, unlike SIG_IGN, is not inherited by the stage.
(Multi-process launches hand the signal to torch's elastic agent, which stops its workers itself.)
A stage that fails in a multi-process launch has said why on its ranks; the elastic agent's ChildFailedError
traceback after that (accelerate's --quiet covers one-process launches only) becomes the stage's exit code; a
rank killed by a signal, which said nothing, is named.
"""
import os
import signal
import sys

import psutil


def on_ctrl_c(signum, frame) -> None:
    if psutil.Process().children():  # the stage has the signal too: it stops, and this launcher with it
        return
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, on_ctrl_c)
    from accelerate.commands.launch import main
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        main()
    except ChildFailedError as failed:
        codes = {rank: f.exitcode for rank, f in failed.failures.items()}
        if any(code > 0 for code in codes.values()):  # the stage said why
            sys.exit(next(code for code in codes.values() if code > 0))
        # killed by a signal (the OOM killer's SIGKILL, say): nothing was said, so say it here; the first to fail
        # is the cause (the agent then stops the others)
        rank, first = failed.get_first_failure()
        print(f"error: rank {rank} was killed by {signal.Signals(-first.exitcode).name}", file=sys.stderr)
        sys.exit(128 - first.exitcode)
