"""Hot-path mechanics of the data plane that need no GPU: large frames and GPU run-ahead."""

from __future__ import annotations

import socket
import threading

import torch

from jupyter_elastic_gpu.agent import executor as ex_mod
from jupyter_elastic_gpu.agent.executor import SessionExecutor
from jupyter_elastic_gpu.protocol.frames import recv_frame, send_frame


def test_a_frame_larger_than_the_socket_buffer_arrives_whole_and_in_order():
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)  # many partial sendmsg calls
    payloads = [torch.arange(n, dtype=torch.int32).numpy() for n in (3, 1 << 20, 0, 777, 1 << 18)]
    got = {}
    reader = threading.Thread(target=lambda: got.update(frame=recv_frame(b)))
    reader.start()
    try:
        send_frame(a, {"op": "batch", "n": len(payloads)}, payloads)
        reader.join(30)
    finally:
        a.close()
        b.close()
    header, bufs = got["frame"]
    assert header == {"op": "batch", "n": 5}
    assert [bytes(x) for x in bufs] == [p.tobytes() for p in payloads]


class FakeEvent:
    """A CUDA event whose completion the test decides."""

    def __init__(self, log):
        self.done = False
        self.log = log

    def record(self):
        pass

    def query(self):
        return self.done

    def synchronize(self):
        self.log.append(self)
        self.done = True


def _executor_with_fake_events(monkeypatch, clock):
    ex = SessionExecutor([torch.device("cpu")])
    waits, made = [], []

    def new_event():
        made.append(FakeEvent(waits))
        return made[-1]

    ex._new_event = new_event
    monkeypatch.setattr(ex_mod.time, "monotonic", lambda: clock[0])
    return ex, waits, made


def test_run_ahead_never_waits_while_the_gpu_keeps_up(monkeypatch):
    clock = [0.0]
    ex, waits, made = _executor_with_fake_events(monkeypatch, clock)
    for _ in range(1000):
        ex._bound_run_ahead()
        made[-1].done = True  # the GPU finished the marked work before the next mark
        clock[0] += 0.01
    assert waits == [] and len(ex._inflight) <= 1


def test_run_ahead_waits_once_the_gpu_is_more_than_the_budget_behind(monkeypatch):
    clock = [0.0]
    ex, waits, made = _executor_with_fake_events(monkeypatch, clock)
    step = 0.01
    for _ in range(100):  # the GPU finishes nothing: every mark stays pending
        ex._bound_run_ahead()
        clock[0] += step
    assert waits, "a GPU that never catches up must be waited for"
    # What stays queued is never older than the budget: that is all an interrupt must drain.
    oldest = ex._inflight[0][0]
    assert clock[0] - step - oldest < ex_mod.RUN_AHEAD_SECONDS
    assert all(w.done for w in waits)
