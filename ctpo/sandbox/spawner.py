"""One long-lived daemon thread that forks children for callers on other threads.

PR_SET_PDEATHSIG fires when the *thread* that forked a child exits, not the process; a child forked by a
short-lived caller thread would be killed as soon as that thread ends. The sandbox's fork server and the
reward workers are therefore started through a `Spawner`, whose thread lives as long as the process.
It lives in ctpo.sandbox because the sandbox package must import alone (the unprivileged test copies it).
"""
from __future__ import annotations

import queue
import threading


class Spawner:
    def __init__(self, name: str) -> None:
        self.requests: queue.Queue = queue.Queue()
        threading.Thread(target=self._loop, name=name, daemon=True).start()

    def _loop(self) -> None:
        while True:
            fn, box, done = self.requests.get()
            try:
                box.append((True, fn()))
            except BaseException as e:  # handed back to the caller
                box.append((False, e))
            done.set()

    def call(self, fn):
        """Run fn() on the spawner's thread; return its value or raise its exception."""
        box: list = []
        done = threading.Event()
        self.requests.put((fn, box, done))
        done.wait()
        ok, value = box[0]
        if not ok:
            raise value
        return value
