"""Stopping a training run cleanly: SIGINT (Ctrl-C) and SIGTERM become a flag that the loop checks
after each iteration (every process at the same one), so the run saves a checkpoint and exits;
before the loop starts, SIGTERM stops at once with nothing written."""
import contextlib
import signal
import sys
import threading

from distributed import any_process


class Terminated(BaseException):
    """SIGTERM before training started (a BaseException, like KeyboardInterrupt: nothing catches it)."""


class StopSignal:
    """Turns SIGINT/SIGTERM into a flag checked after each iteration (by every process at the same
    iteration: `signum` is set once any process has seen one). A repeated SIGTERM changes nothing;
    a second SIGINT (Ctrl-C twice) stops at once, except while a checkpoint is being written."""

    def __init__(self):
        self.signum, self.received, self.previous, self.writing = None, None, {}, False

    def seen(self, device):
        if any_process(self.received is not None, device):
            self.signum = self.received or signal.SIGTERM
        return self.signum is not None

    @contextlib.contextmanager
    def writing_checkpoint(self):
        """A checkpoint write that a second Ctrl-C does not cut short."""
        self.writing = True
        try:
            yield
        finally:
            self.writing = False

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signum
            print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this iteration", file=sys.stderr)
        elif signum == signal.SIGINT and not self.writing:
            raise KeyboardInterrupt

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def terminate_before_training():
    """SIGTERM outside the training loop (loading data, building the networks) raises Terminated;
    repeats are ignored. The loop's StopSignal takes over while it runs."""
    def handle(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
