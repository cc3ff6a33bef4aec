"""`accelerate launch`, as the Makefile runs every stage, without a traceback of its own on Ctrl-C.

Ctrl-C reaches the whole foreground process group: the stage stops and says how to resume (run_main), while the
launcher, waiting on it, would add a KeyboardInterrupt traceback under that message. Here the launcher lets the
signal pass and exits as its stage does. A handler, unlike SIG_IGN, is not inherited by the stage it starts.
(Multi-process launches hand the signal to torch's elastic agent, which stops its workers itself.)
"""
import signal

if __name__ == "__main__":
    signal.signal(signal.SIGINT, lambda signum, frame: None)  # first: importing accelerate takes seconds
    from accelerate.commands.launch import main

    main()
