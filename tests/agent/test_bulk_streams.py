"""Parallel bulk streams (protocol/bulk.py): large payloads split across a session's extra
connections, both directions, whole or an error; and what a hostile client can do with them.

The mechanics run over socket pairs (no agent); then a real agent serves a client whose
uploads and fetches go over 1 to 4 streams, and raw sockets play the attacker: bulk streams
for unknown or foreign sessions, wrong secrets and nonces, chunks for transfers that do not
exist, outside their transfer, overlapping or duplicated, and announcements that lie.
"""

from __future__ import annotations

import re
import socket
import threading
import uuid

import pytest
import torch

from jupyter_elastic_gpu.protocol import bulk
from jupyter_elastic_gpu.protocol import messages as m
from jupyter_elastic_gpu.protocol.frames import encode_frame, recv_frame, send_frame, send_frames
from jupyter_elastic_gpu.protocol.messages import ProtocolError
from jupyter_elastic_gpu.protocol.values import host_buffer

MiB = 1 << 20


def pairs(k):
    """``k`` connected stream pairs: (sender's BulkStreams, receiver's BulkStreams)."""
    tx, rx = bulk.BulkStreams("tx"), bulk.BulkStreams("rx")
    for i in range(k):
        a, b = socket.socketpair()
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)  # many partial sends
        tx.add(i, a)
        rx.add(i, b)
    return tx, rx


def in_thread(fn):
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=run)
    t.start()
    return t, box


@pytest.mark.parametrize("n, parts", [(1, 1), (5 * MiB + 3, 4), (8 * MiB, 3), (MiB, 16)])
def test_parts_cover_a_transfer_exactly_on_page_boundaries(n, parts):
    pieces = bulk.split(n, parts)
    assert len(pieces) == parts and pieces[0][0] == 0
    assert all(a + k == b for (a, k), (b, _) in zip(pieces, pieces[1:], strict=False))
    assert sum(k for _, k in pieces) == n and all(k > 0 for _, k in pieces)
    assert all(off % 4096 == 0 for off, _ in pieces)
    assert bulk.parts_for(3 * MiB, 4) == 3 and bulk.parts_for(100, 4) == 1


def roundtrip(tx, rx, payloads, min_bytes=MiB):
    bufs = list(payloads)
    ann, transfers = tx.outgoing(bufs, min_bytes)
    got = list(bufs)
    t, box = in_thread(lambda: rx.receive({"bulk": ann}, got, host_buffer))
    tx.send(transfers)
    t.join(30)
    if "error" in box:
        raise box["error"]
    return [bytes(g.numpy()) if isinstance(g, torch.Tensor) else bytes(g) for g in got]


@pytest.mark.parametrize("k", [1, 2, 4])
def test_payloads_arrive_whole_over_k_streams_and_leave_the_frame(k):
    tx, rx = pairs(k)
    payloads = [
        torch.arange(3 * MiB, dtype=torch.int32).numpy(),
        b"inline",
        torch.ones(MiB).numpy(),
    ]
    try:
        bufs = list(payloads)
        ann, _ = bulk.BulkStreams().outgoing(bufs, MiB)  # no streams: everything stays inline
        assert ann == [] and bufs == payloads
        assert roundtrip(tx, rx, payloads) == [bytes(p) for p in payloads]
        assert tx.sent_x == rx.recv_x == 2
    finally:
        tx.close()
        rx.close()


def test_transfers_of_many_frames_keep_their_order_and_ids():
    tx, rx = pairs(3)
    try:
        for i in range(5):
            payloads = [torch.full((MiB + i * 4096,), i, dtype=torch.uint8).numpy(), b"x" * i]
            assert roundtrip(tx, rx, payloads) == [bytes(p) for p in payloads]
        assert tx.sent_x == rx.recv_x == 5
    finally:
        tx.close()
        rx.close()


# -- announcements that lie ------------------------------------------------------------------


@pytest.mark.parametrize(
    "ann, lengths, why",
    [
        ("x", [0], "list"),
        ([], [0], "list"),
        ([[0, 1, 10]], [0], "[buf, x, bytes, parts]"),
        ([[0, 1, 10, True]], [0], "[buf, x, bytes, parts]"),
        ([[1, 1, 10, 1]], [0], "not an empty payload"),
        ([[0, 1, 10, 1]], [5], "not an empty payload"),
        ([[0, 4, 10, 1], [0, 5, 10, 1]], [0, 0], "named once"),
        ([[0, 3, 10, 1]], [0], "does not follow"),  # last_x is 3 below
        ([[0, 4, 0, 1]], [0], "claims 0 bytes"),
        ([[0, 4, 1 << 50, 1]], [0], "bytes (1 to"),
        ([[0, 4, 10, 3]], [0], "2 bulk streams are open"),
        ([[0, 4, 10, 0]], [0], "claims 0 parts"),
        ([[0, 4, 1, 2]], [0], "claims 2 parts"),  # more parts than bytes
    ],
)
def test_bulk_announcements_are_checked_before_anything_is_allocated(ann, lengths, why):
    with pytest.raises(ProtocolError, match=re.escape(why)):
        m.parse_bulk(ann, lengths, streams=2, last_x=3, max_bytes=64 << 30)


# -- hostile chunks, over socket pairs --------------------------------------------------------


def receive_one(rx, n, parts, x=1):
    got = [b""]
    return in_thread(lambda: rx.receive({"bulk": [[0, x, n, parts]]}, got, host_buffer)), got


def chunk(sock, x, off, n, data=None):
    data = bytes(n) if data is None else data
    send_frames(sock, [encode_frame(m.Chunk(x=x, off=off, n=n).header(), [data])])


@pytest.mark.parametrize(
    "chunks, why",
    [
        ([(0, 7, 0, 4096)], "chunk of transfer 7; transfer 1 is the one due"),
        ([(0, 1, 8192, 4096)], "lies outside transfer 1"),
        ([(0, 1, -4096, 4096)], "lies outside transfer 1"),
        ([(0, 1, 0, 4096), (1, 1, 0, 4096)], "overlaps bytes"),  # a duplicate on another stream
        ([(0, 1, 0, 6000), (1, 1, 4096, 4096)], "overlaps bytes"),
        ([(0, 1, 0, 2048), (1, 1, 4096, 2048)], "incomplete"),
    ],
)
def test_hostile_chunks_are_refused_before_their_bytes_land(chunks, why):
    tx, rx = pairs(2)
    try:
        (t, box), got = receive_one(rx, 8192, 2)
        for i, x, off, n in chunks:
            chunk(tx.socks[i], x, off, n, bytes([0xAB]) * n)
        if why != "incomplete" and len(chunks) == 1:
            tx.close()  # the other stream's peer goes away: its reader must not hang
        t.join(30)
        assert isinstance(box.get("error"), ProtocolError), box
        assert why in str(box["error"])
        assert rx.broken is not None
    finally:
        tx.close()
        rx.close()


@pytest.mark.parametrize(
    "frame",
    [
        encode_frame({"op": "hello", "session": "s", "secret": "x"}),
        encode_frame({"op": "chunk", "x": 1, "off": 0, "n": 10}, [bytes(5)]),  # lying length
        encode_frame({"op": "chunk", "x": 1, "off": 0, "n": 5, "pad": "p" * 500}, [bytes(5)]),
        encode_frame({"op": "chunk", "x": "1", "off": 0, "n": 5}, [bytes(5)]),
    ],
)
def test_a_bulk_stream_carries_chunk_frames_only(frame):
    tx, rx = pairs(1)
    try:
        (t, box), _ = receive_one(rx, 5, 1)
        send_frames(tx.socks[0], [frame])
        t.join(30)
        assert isinstance(box.get("error"), ProtocolError), box
    finally:
        tx.close()
        rx.close()


def test_a_stream_that_dies_mid_chunk_is_an_error_never_short_bytes():
    tx, rx = pairs(2)
    try:
        (t, box), got = receive_one(rx, 2 * MiB, 2)
        sock = tx.socks[0]
        header = encode_frame(m.Chunk(x=1, off=0, n=MiB).header(), [bytes(MiB)])
        sock.sendall(b"".join(bytes(p) for p in header)[: MiB // 2])  # half a chunk, then gone
        tx.close()
        t.join(30)
        assert isinstance(box.get("error"), (ConnectionError, OSError)), box
        with pytest.raises(ConnectionError, match="broke earlier"):
            rx.receive({"bulk": [[0, 2, 10, 1]]}, [b""], host_buffer)
    finally:
        rx.close()


# -- through a real agent --------------------------------------------------------------------


def with_streams(sess, k, min_mib=1):
    sess.bulk_streams, sess.bulk_min = k, int(min_mib * MiB)
    return sess


@pytest.mark.parametrize("k", [0, 1, 4])
def test_uploads_and_fetches_over_k_streams_are_exact(agent, own_session, k):
    with own_session(agent.address) as sess:
        with_streams(sess, k)
        small = torch.arange(1000.0).cuda()
        assert small.sum().item() == 499500.0 and sess._bulk is None  # small sessions pay nothing
        xs = [torch.randn(n) for n in (MiB // 4 - 1, 3 * MiB // 4, 5 * MiB // 4 + 7)]
        ys = [x.cuda() for x in xs]  # <1, 3, 5 MiB: inline, and over up to 3 or 4 parts
        zs = [(y * 2).cpu() for y in ys]
        for x, z in zip(xs, zs, strict=True):
            assert torch.equal(z, x * 2)
        assert (sess._bulk is not None and sess._bulk.count == k) if k else sess._bulk is None
        if k:
            assert sess._bulk.sent_x == 2 and sess._bulk.recv_x == 2  # the 3 and 5 MiB ones
        # Uploads taken at the op: changing the CPU tensor afterwards changes nothing there.
        x = torch.ones(MiB)
        y = x.cuda()
        x.zero_()
        assert y.sum().item() == MiB


def test_a_reconnected_session_opens_new_streams_and_the_old_ones_end(agent, own_session):
    with own_session(agent.address) as sess:
        with_streams(sess, 2)
        x = torch.randn(MiB)
        y = x.cuda()
        old = sess._bulk
        assert old is not None and old.count == 2
        sess._hang_up()  # the connection drops; the session lives on in the agent
        sess.attached = False
        assert torch.equal(y.cpu(), x)  # reconnects, reopens streams, fetches over them
        assert sess._bulk is not None and sess._bulk is not old and not old.socks


# -- hostile clients against a real agent -------------------------------------------------------


def raw_session(address, session, secret="right-secret"):
    host, port = address.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=90)
    send_frame(s, m.Hello(session=session, secret=secret, fraction=0.25).header())
    reply, _ = recv_frame(s)
    assert reply.get("ok"), reply
    return s, reply["bulk_offer"]


def raw_bulk(address, session, secret, conn, index=0):
    host, port = address.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=30)
    hello = m.BulkHello(session=session, secret=secret, conn=conn, index=index)
    send_frame(s, hello.header())
    return s, recv_frame(s)[0]


def test_bulk_streams_need_the_session_secret_and_its_live_connection(agent):
    s, offer = raw_session(agent.address, "bulk-owner")
    other, other_offer = raw_session(agent.address, "bulk-other", "other-secret")
    try:
        refusals = [
            raw_bulk(agent.address, "bulk-owner", "guessed", offer["conn"]),
            raw_bulk(agent.address, "no-such-session", "right-secret", offer["conn"]),
            # another session's secret and nonce do not open this one's streams
            raw_bulk(agent.address, "bulk-owner", "other-secret", other_offer["conn"]),
            # the right secret with a nonce of another connection (a stale or forged one)
            raw_bulk(agent.address, "bulk-owner", "right-secret", other_offer["conn"]),
            raw_bulk(agent.address, "bulk-owner", "right-secret", offer["conn"], index=16),
        ]
        for sock, reply in refusals:
            assert "error" in reply, reply
            assert reply["error"]["type"] in ("PermissionError", "ProtocolError"), reply
            sock.close()
        msgs = [r["error"]["message"] for _, r in refusals]
        assert "wrong secret" in msgs[0] and "wrong secret" in msgs[1] and "wrong secret" in msgs[2]
        assert "no live connection" in msgs[3] and "stream index" in msgs[4]
        # The owner's own stream is taken, and nothing above disturbed either session.
        b, reply = raw_bulk(agent.address, "bulk-owner", "right-secret", offer["conn"])
        assert reply == {"ok": True, "index": 0}
        for sock in (s, other):
            send_frame(sock, {"op": "sync"})
            assert recv_frame(sock)[0].get("ok")
        b.close()
    finally:
        for sock in (s, other):
            send_frame(sock, {"op": "close"})
            sock.close()


def still_serving(address):
    """A fresh, honest session (a name never used before) works end to end."""
    s, _ = raw_session(address, f"honest-{uuid.uuid4().hex[:8]}")
    try:
        op = ["aten::ones.default", [[3]], {"device": {"dev": "cuda", "i": 0}}, [1], 0]
        send_frame(s, {"op": "batch", "ops": [op], "free": []})
        send_frame(s, {"op": "fetch", "t": 1})
        reply, bufs = recv_frame(s)
        assert reply.get("ok") and bytes(bufs[0]) == torch.ones(3).numpy().tobytes()
        send_frame(s, {"op": "close"})
    finally:
        s.close()
    return True


def upload_announced(s, n, parts=1, x=1):
    """A batch that makes tensor 1 from an n-byte payload announced on the bulk streams."""
    op = ["aten::clone.default", [{"cpu": 0, "dtype": "uint8", "shape": [n]}], {}, [1], 0]
    send_frame(s, {"op": "batch", "ops": [op], "bulk": [[0, x, n, parts]]}, [b""])


@pytest.mark.parametrize(
    "chunks, why",
    [
        ([(0, 9, 0, 8192)], "transfer 1 is the one due"),  # a transfer that does not exist
        ([(0, 1, 4096, 8192)], "lies outside transfer 1"),
        ([(0, 1, 0, 8192), (1, 1, 0, 8192)], "overlaps bytes"),  # the same chunk twice
        ([(0, 1, 0, 4096), (1, 1, 0, 4096)], "overlaps bytes"),
    ],
)
def test_hostile_chunks_are_refused_and_the_agent_serves_on(agent, chunks, why):
    name = f"bulk-hostile-{abs(hash((why, len(chunks))))}"
    s, offer = raw_session(agent.address, name)
    streams = [raw_bulk(agent.address, name, "right-secret", offer["conn"], i)[0] for i in (0, 1)]
    try:
        upload_announced(s, 8192, parts=2)
        for i, x, off, n in chunks:
            chunk(streams[i], x, off, n)
        send_frame(s, {"op": "sync"})
        err = recv_frame(s)[0]["error"]
        assert err["type"] == "ProtocolError" and why in err["message"], err
        with pytest.raises((ConnectionError, OSError)):  # the stream cannot be trusted: gone
            send_frame(s, {"op": "sync"})
            recv_frame(s)
    finally:
        for sock in (s, *streams):
            sock.close()
    assert still_serving(agent.address)


def test_an_announcement_without_bulk_streams_is_refused(agent):
    s, _ = raw_session(agent.address, "bulk-none")
    try:
        upload_announced(s, 4096)
        err = recv_frame(s)[0]["error"]
        assert err["type"] == "ProtocolError" and "0 bulk streams are open" in err["message"]
    finally:
        s.close()
    assert still_serving(agent.address)


def test_ctrl_c_while_a_bulk_reply_arrives_is_raised_once_it_is_whole_and_stays_owed():
    """As for a reply on the session's connection (test_data_plane): Ctrl-C in the middle of
    a reply's bulk bytes is held back until the last chunk is in; that reply, whole, is what
    the next read returns, and the streams stay in step for the reply after it."""
    import signal
    import time

    from jupyter_elastic_gpu.protocol.frames import FrameReader
    from jupyter_elastic_gpu.remote.session import DirectLease, RemoteSession

    a, b = socket.socketpair()
    tx, rx = pairs(2)
    sess = RemoteSession(DirectLease("127.0.0.1:1", 1.0))
    sess.sock, sess._reader, sess._owed_replies = a, FrameReader(a, host_buffer), 2
    sess._bulk = rx
    payload = bytes(range(256)) * (8 << 12)  # 2 MiB in 2 parts
    (o0, n0), (o1, n1) = bulk.split(len(payload), 2)
    chunks = [
        b"".join(
            bytes(p) for p in encode_frame(m.Chunk(x=1, off=o, n=n).header(), [payload[o : o + n]])
        )
        for o, n in ((o0, n0), (o1, n1))
    ]

    def agent():
        send_frame(b, {"ok": True, "n": 1, "bulk": [[0, 1, len(payload), 2]]}, [b""])
        tx.socks[0].sendall(chunks[0][:5000])  # the bulk read has begun
        time.sleep(0.3)
        signal.raise_signal(signal.SIGINT)  # handled on the main thread, inside the read
        time.sleep(0.2)
        tx.socks[0].sendall(chunks[0][5000:])
        tx.socks[1].sendall(chunks[1])
        send_frame(b, {"ok": True, "n": 2})

    t = threading.Thread(target=agent)
    t.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            sess._recv()
        t.join(10)
        reply, bufs = sess._recv()
        assert reply["n"] == 1 and bytes(bufs[0].numpy()) == payload
        assert sess._recv()[0] == {"ok": True, "n": 2} and sess._owed_replies == 0
        assert rx.broken is None and rx.recv_x == 1
    finally:
        sess.sock = sess._reader = sess._bulk = None
        sess.close()
        for s in (a, b):
            s.close()
        tx.close()
        rx.close()
