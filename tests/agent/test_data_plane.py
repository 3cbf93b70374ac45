"""Hot-path mechanics of the data plane that need no GPU: large frames and GPU run-ahead."""

from __future__ import annotations

import socket
import threading

import pytest
import torch

from jupyter_elastic_gpu.agent import executor as ex_mod
from jupyter_elastic_gpu.agent.executor import SessionExecutor
from jupyter_elastic_gpu.protocol.frames import (
    FrameReader,
    encode_frame,
    recv_frame,
    send_frame,
    send_frames,
)
from jupyter_elastic_gpu.protocol.values import host_buffer, tensor_from_buffer


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


def test_the_frame_reader_splits_a_stream_of_frames_however_the_bytes_arrive():
    """Frames sent back to back in one write (a batch and its sync request), small and large
    payloads, a header bigger than the reader's buffer: each comes out whole, in order, and
    large payloads land in the memory ``alloc`` gave."""
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
    big = torch.arange(3 << 18, dtype=torch.float32)  # 3 MiB: past the reader's buffer
    frames = [
        ({"op": "batch", "i": 0}, [torch.arange(5).numpy(), big.numpy()]),
        ({"op": "fetch", "i": 1}, []),
        ({"op": "batch", "pad": "x" * (FrameReader.CHUNK + 5)}, [b"", b"tail"]),
    ]
    got = []

    def read():
        reader = FrameReader(b, host_buffer)
        got.extend(reader.recv() for _ in frames)

    t = threading.Thread(target=read)
    t.start()
    try:
        send_frames(a, [encode_frame(h, bufs) for h, bufs in frames])
        t.join(30)
    finally:
        a.close()
        b.close()
    assert [h for h, _ in got] == [h for h, _ in frames]
    small, large = got[0][1]
    assert isinstance(large, torch.Tensor)  # host memory from alloc, viewed without a copy
    assert torch.equal(tensor_from_buffer({"dtype": "float32", "shape": [3 << 18]}, large), big)
    assert torch.equal(
        tensor_from_buffer({"dtype": "int64", "shape": [5]}, small), torch.arange(5)
    )
    assert [bytes(x.numpy()) if isinstance(x, torch.Tensor) else bytes(x) for x in got[2][1]] == [
        b"",
        b"tail",
    ]


def test_a_frame_reader_reports_a_peer_that_hangs_up_mid_frame():
    a, b = socket.socketpair()
    whole = b"".join(bytes(p) for p in encode_frame({"op": "sync"}, [b"abcdef"]))
    a.sendall(whole[:-3])
    a.close()
    try:
        with pytest.raises(ConnectionError):
            FrameReader(b).recv()
    finally:
        b.close()


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


def test_ends_that_poll_for_the_next_frame_keep_answers_in_order_and_ctrl_c_working(make_agent):
    """Where cores allow, client and worker poll before sleeping (ELASTIC_GPU_SPIN_US; off on
    machines under 4 cores, like CI's): the same answers, and Ctrl-C still stops queued work."""
    import os
    import subprocess
    import sys
    import textwrap

    spin = {"ELASTIC_GPU_SPIN_US": "2000"}
    agent = make_agent(env=spin)
    prog = textwrap.dedent(f"""
        import signal, threading, torch
        from jupyter_elastic_gpu import remote
        from jupyter_elastic_gpu.remote import session
        from jupyter_elastic_gpu.agent import worker
        assert session.SPIN_SECONDS == worker.SPIN_SECONDS == 0.002
        remote.attach({agent.address!r}, fraction=1.0)
        x = torch.arange(16.0, device="cuda")
        print("sums", [(x[i] + 1).item() for i in range(16)] == [float(i + 1) for i in range(16)])
        y = torch.ones(256, 256, device="cuda")
        for _ in range(3000):
            y = (y @ y) / 256
        threading.Timer(0.5, lambda: signal.raise_signal(signal.SIGINT)).start()
        try:
            y.sum().item()
            print("not interrupted")
        except KeyboardInterrupt:
            print("interrupted")
        print("after", torch.ones(3, device="cuda").sum().item())
    """)
    p = subprocess.run(
        [sys.executable, "-c", prog],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, **spin),
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.split("\n")[:3] == ["sums True", "interrupted", "after 3.0"], p.stdout


def test_ctrl_c_while_a_reply_arrives_is_raised_once_it_is_whole_and_the_reply_stays_owed():
    """Ctrl-C in the middle of a large reply must not cut the frame (the stream would fall
    out of step with every later reply): it is raised once the frame is whole, and that
    frame is the reply the next read returns."""
    import signal
    import time

    from jupyter_elastic_gpu.remote.session import DirectLease, RemoteSession

    a, b = socket.socketpair()
    sess = RemoteSession(DirectLease("127.0.0.1:1", 1.0))
    sess.sock, sess._reader, sess._owed_replies = a, FrameReader(a, host_buffer), 2
    first = b"".join(bytes(p) for p in encode_frame({"ok": True, "n": 1}, [bytes(4 << 20)]))
    second = b"".join(bytes(p) for p in encode_frame({"ok": True, "n": 2}))

    def agent():
        b.sendall(first[:1000])  # the wait ends and the read of the frame begins
        time.sleep(0.3)
        signal.raise_signal(signal.SIGINT)  # handled on the main thread, inside the read
        time.sleep(0.2)
        b.sendall(first[1000:] + second)

    t = threading.Thread(target=agent)
    t.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            sess._recv()
        t.join(10)
        reply, bufs = sess._recv()
        assert reply == {"ok": True, "n": 1} and len(bufs[0]) == 4 << 20
        assert sess._recv()[0] == {"ok": True, "n": 2} and sess._owed_replies == 0
    finally:
        sess.sock = sess._reader = None
        sess.close()
        a.close()
        b.close()


def test_a_large_batch_after_an_abandoned_large_reply_does_not_deadlock():
    """A Ctrl-C can leave a large reply owed (a fetch) while the worker is still writing it.
    The next thing the client sends may be large too (a batch with an upload): it must read
    the owed reply first, or both ends block on full socket buffers for ever."""
    from jupyter_elastic_gpu.remote.session import DirectLease, RemoteSession

    a, b = socket.socketpair()
    a.settimeout(20)
    b.settimeout(20)
    sess = RemoteSession(DirectLease("127.0.0.1:1", 1.0))
    sess.sock, sess._reader, sess._owed_replies = a, FrameReader(a, host_buffer), 1
    got = []

    def agent():  # writes the whole owed reply before it reads anything, as a worker does
        send_frame(b, {"ok": True, "n": 1}, [bytes(16 << 20)])
        got.append(recv_frame(b))

    t = threading.Thread(target=agent, daemon=True)
    t.start()
    try:
        sess._send_frames([encode_frame({"op": "batch", "ops": []}, [bytes(16 << 20)])])
        t.join(20)
        assert not t.is_alive() and got[0][0]["op"] == "batch" and len(got[0][1][0]) == 16 << 20
        assert sess._owed_replies == 0
    finally:
        sess.sock = sess._reader = None
        sess.close()
        a.close()
        b.close()


def test_a_payload_that_cannot_be_pinned_is_received_into_pageable_memory(monkeypatch):
    # Page-locked memory runs out (or, above PIN_MAX_BYTES, is not asked for: the caching
    # host allocator would keep a power-of-two block of it for the worker's life); the
    # upload still lands, its copy to the GPU is only synchronous.
    from jupyter_elastic_gpu.protocol import values

    real_empty = torch.empty
    asked = []

    def empty(*a, pin_memory=False, **kw):
        asked.append(pin_memory)
        if pin_memory:
            raise RuntimeError("CUDA error: out of memory (cudaHostAlloc)")
        return real_empty(*a, **kw)

    monkeypatch.setattr(values.torch, "empty", empty)
    t, view = values.host_buffer(4096, pin=True)
    assert asked == [True, False] and not t.is_pinned() and len(view) == 4096
    asked.clear()
    monkeypatch.setattr(values, "PIN_MAX_BYTES", 1024)
    t, view = values.host_buffer(4096, pin=True)
    assert asked == [False] and len(view) == 4096
