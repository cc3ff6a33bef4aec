"""`accelerate launch`, as the Makefile runs every stage, without a traceback of its own on Ctrl-C.

Ctrl-C reaches the whole foreground process group: the stage stops and says how to resume (run_main), while the
launcher, waiting on it, would add a KeyboardInterrupt traceback under that message. Here the launcher lets the
signal pass while its stage runs, and exits as the stage does; before the stage has started (accelerate takes
seconds to import) Ctrl-C ends the launcher at once, as a signal does (raising KeyboardInterrupt there could be
swallowed by a library's import). The handler, unlike SIG_IGN, is not inherited by the stage.
(Multi-process launches hand the signal to torch's elastic agent, which stops its workers itself.)
A stage that fails in a multi-process launch has said why on its ranks; the elastic agent's ChildFailedError
traceback after that (accelerate's --quiet covers one-process launches only) becomes the stage's exit code.
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
        sys.exit(next((f.exitcode for f in failed.failures.values() if f.exitcode > 0), 1))
