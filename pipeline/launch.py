"""`accelerate launch`, as the Makefile runs every stage, without a traceback of its own on Ctrl-C.

Ctrl-C reaches the whole foreground process group: the stage stops and says how to resume (run_main), while the
launcher, waiting on it, would add a KeyboardInterrupt traceback under that message. Here the launcher lets the
signal pass while its stage runs, and exits as the stage does; before the stage has started (accelerate takes
seconds to import) Ctrl-C ends the launcher at once, as a signal does (raising KeyboardInterrupt there could be
swallowed by a library's import). The handler, unlike SIG_IGN, is not inherited by the stage.
(Multi-process launches hand the signal to torch's elastic agent, which stops its workers itself.)
A stage that fails in a multi-process launch has said why on its ranks; the elastic agent's ChildFailedError
traceback after that (accelerate's --quiet covers one-process launches only) becomes the stage's exit code; a
rank killed by a signal, which said nothing, is named. A one-process launch exits with its stage's code too
(--quiet's own exit is 1 whatever the code, so `make` and scripts could not tell Ctrl-C, 130, from a failure),
and Ctrl-C that stopped a multi-process launch exits 130 rather than with the agent's SignalException traceback.
"""
import os
import signal
import subprocess
import sys

import psutil


def on_ctrl_c(signum, frame) -> None:
    if psutil.Process().children():  # the stage has the signal too: it stops, and this launcher with it
        return
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)


def exit_killed(signum: int, who: str) -> None:
    """Exit as a shell reports a process killed by signal `signum` (128 + signum). The process said nothing, so
    this says it, unless it was Ctrl-C (which the user knows of)."""
    if signum != signal.SIGINT:
        print(f"error: {who} was killed by {signal.Signals(signum).name}", file=sys.stderr)
    sys.exit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, on_ctrl_c)
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args()
    args.quiet = False  # a failed one-process stage then raises its exit code (below) instead of exiting 1
    try:
        launch_command(args)
    except subprocess.CalledProcessError as failed:  # one process: it said why, or was killed by a signal
        if failed.returncode > 0:
            sys.exit(failed.returncode)
        exit_killed(-failed.returncode, "the stage")
    except ChildFailedError as failed:
        codes = {rank: f.exitcode for rank, f in failed.failures.items()}
        if any(code > 0 for code in codes.values()):  # the stage said why
            sys.exit(next(code for code in codes.values() if code > 0))
        # killed by a signal (the OOM killer's SIGKILL, say); the first to fail is the cause (the agent then stops
        # the others)
        rank, first = failed.get_first_failure()
        exit_killed(-first.exitcode, f"rank {rank}")
    except SignalException as signalled:  # the elastic agent got Ctrl-C (or a kill) and has stopped the ranks
        sys.exit(128 + signalled.sigval)
