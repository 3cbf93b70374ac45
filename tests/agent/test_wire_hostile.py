"""The agent as an attacker sees it: random, truncated and hostile frames, forged ids, foreign ops.

Whatever arrives, the agent answers with an error (or hangs up on a stream it cannot
trust) and keeps serving every other session; nothing on the wire can run code.
"""

from __future__ import annotations

import json
import pickle
import socket
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jupyter_elastic_gpu.protocol.client import parse_address, query_inventory
from jupyter_elastic_gpu.protocol.frames import encode_frame, recv_frame, send_frame


def connect(address):
    # Generous: a new session's worker starts a process and, on a GPU, a CUDA context.
    s = socket.create_connection(parse_address(address), timeout=90)
    return s


def open_session(address, session="attacker", secret="s3cret"):
    s = connect(address)
    send_frame(
        s, {"op": "hello", "session": session, "secret": secret, "token": None, "fraction": 0.25}
    )
    reply, _ = recv_frame(s)
    assert reply.get("ok"), reply
    return s


def request(s, header, bufs=()):
    send_frame(s, header, bufs)
    return recv_frame(s)[0]


def still_serving(address):
    """A fresh, honest session works end to end."""
    s = open_session(address, session="honest-" + str(id(address)) + str(socket.socket().fileno()))
    try:
        send_frame(
            s,
            {
                "op": "batch",
                "ops": [["aten::ones.default", [[3]], {"device": {"dev": "cuda", "i": 0}}, [1], 0]],
                "free": [],
            },
        )
        reply, bufs = (lambda s: (send_frame(s, {"op": "fetch", "t": 1}), recv_frame(s))[1])(s)
        assert reply.get("ok") and bytes(bufs[0]) == torch.ones(3).numpy().tobytes()
        send_frame(s, {"op": "close"})
    finally:
        s.close()
    return True


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(junk=st.binary(min_size=0, max_size=300))
def test_random_first_frames_are_refused(agent, junk):
    with connect(agent.address) as s:
        try:  # the agent may refuse and hang up before it has read everything
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(15)
            data = s.recv(65536)
        except (OSError, TimeoutError):  # reset, broken pipe, not connected
            data = b""
        assert b"Traceback" not in data
    assert query_inventory(agent.address)["agent"]["id"]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    header=st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False)
        | st.text(max_size=20),
        lambda c: (
            st.lists(c, max_size=4)
            | st.dictionaries(
                st.sampled_from(
                    [
                        "op",
                        "ops",
                        "t",
                        "name",
                        "args",
                        "kwargs",
                        "free",
                        "seed",
                        "dev",
                        "cpu",
                        "dtype",
                        "shape",
                    ]
                ),
                c,
                max_size=4,
            )
        ),
        max_leaves=20,
    )
)
def test_random_json_requests_get_error_replies(agent, header):
    s = open_session(agent.address, session="fuzz")
    try:
        hdr = header if isinstance(header, dict) else {"op": header}
        if hdr.get("op") in ("close", "batch", "renew"):
            hdr["op"] = "sync"  # those send no reply by design
        reply = request(s, hdr)
        assert "ok" in reply or "error" in reply
        assert request(s, {"op": "sync"}) is not None  # the session still answers
    finally:
        s.close()


def test_ops_outside_the_allow_list_never_run(agent, tmp_path):
    marker = tmp_path / "pwned"
    s = open_session(agent.address, session="evil-ops")
    try:
        for name in [
            "builtins::eval.default",
            "os::system.default",
            "aten::__class__.default",
            "aten::from_file.default",
            "torch.ops.aten.add.Tensor",
            "aten::add.__init__",
            "aten::add",
            "_ops::aten.default",
            "prims::__getattr__.default",
            42,
            None,
        ]:
            send_frame(
                s,
                {
                    "op": "batch",
                    "free": [],
                    "ops": [[name, [f"__import__('os').system('touch {marker}')"], {}, [], 0]],
                },
            )
            reply = request(s, {"op": "sync"})
            # A record led by an int is a signature use (messages.SigUse): none is defined.
            assert reply["error"]["type"] in (
                ("ProtocolError",)
                if type(name) is int
                else ("PermissionError", "NotImplementedError", "OpError")
            ), reply
            assert "Traceback" not in reply["error"]["message"]
        assert not marker.exists()
    finally:
        s.close()
    assert still_serving(agent.address)


def test_pickled_payloads_are_just_bytes(agent):
    evil = pickle.dumps(eval)  # noqa: S301 - the point is that it is never unpickled
    s = open_session(agent.address, session="pickle")
    try:
        send_frame(
            s,
            {
                "op": "batch",
                "free": [],
                "ops": [
                    [
                        "aten::add.Tensor",
                        [
                            {"cpu": 0, "dtype": "float32", "shape": [len(evil) // 4]},
                            {"cpu": 0, "dtype": "float32", "shape": [len(evil) // 4]},
                        ],
                        {},
                        [7],
                        0,
                    ]
                ],
            },
            [evil[: (len(evil) // 4) * 4]],
        )
        reply = request(s, {"op": "sync"})
        assert reply.get("ok")  # the bytes were read as float32 numbers, nothing more
    finally:
        s.close()


def test_sessions_cannot_name_each_others_tensors(agent):
    a = open_session(agent.address, session="alice", secret="a")
    b = open_session(agent.address, session="bob", secret="b")
    try:
        send_frame(
            a,
            {
                "op": "batch",
                "free": [],
                "ops": [["aten::full.default", [[4], 1234.0], {"device": {"dev": "cuda"}}, [1], 0]],
            },
        )
        assert request(a, {"op": "sync"}).get("ok")
        reply = request(b, {"op": "fetch", "t": 1})
        assert "unknown tensor id" in reply["error"]["message"]
        # Reconnecting to alice's session needs alice's secret.
        c = connect(agent.address)
        send_frame(c, {"op": "hello", "session": "alice", "secret": "guess", "token": None})
        assert "wrong secret" in recv_frame(c)[0]["error"]["message"]
        c.close()
    finally:
        a.close()
        b.close()


def test_oversized_and_lying_frames_are_refused_without_allocating(agent):
    s = open_session(agent.address, session="liar")
    # A prefix claiming a 2**62-byte buffer: refused before any read or allocation.
    s.sendall(struct.pack("<II", 2, 1) + struct.pack("<Q", 1 << 62) + b"{}")
    reply, _ = recv_frame(s)
    assert "exceeds" in reply["error"]["message"]
    s.close()
    s = open_session(agent.address, session="liar2")
    try:
        # A tensor whose shape claims far more bytes than the buffer carries.
        send_frame(
            s,
            {
                "op": "batch",
                "free": [],
                "ops": [
                    [
                        "aten::clone.default",
                        [{"cpu": 0, "dtype": "float32", "shape": [1 << 40]}],
                        {},
                        [1],
                        0,
                    ]
                ],
            },
            [b"\0" * 16],
        )
        assert "needs" in request(s, {"op": "sync"})["error"]["message"]
        for shape in ([-1], [1 << 62, 1 << 62], "3"):
            send_frame(
                s,
                {
                    "op": "batch",
                    "free": [],
                    "ops": [
                        ["aten::empty.memory_format", [shape], {"device": {"dev": "cuda"}}, [2], 0]
                    ],
                },
            )
            assert "error" in request(s, {"op": "sync"})
        # Negative strides and out-of-bounds views are torch's own checks, reported as errors.
        send_frame(
            s,
            {
                "op": "batch",
                "free": [],
                "ops": [
                    ["aten::zeros.default", [[4]], {"device": {"dev": "cuda"}}, [3], 0],
                    ["aten::as_strided.default", [{"t": 3}, [4], [-1]], {}, [4], 0],
                    ["aten::as_strided.default", [{"t": 3}, [100], [1]], {}, [5], 0],
                ],
            },
        )
        assert "error" in request(s, {"op": "sync"})
        send_frame(
            s,
            {
                "op": "batch",
                "free": [],
                "ops": [["aten::as_strided.default", [{"t": 3}, [100], [1]], {}, [5], 0]],
            },
        )
        assert "out of bounds" in request(s, {"op": "sync"})["error"]["message"]
    finally:
        s.close()
    assert still_serving(agent.address)


@pytest.mark.parametrize("cut", [1, 5, 9, 20])
def test_truncated_frames_leave_the_agent_serving(agent, cut):
    s = open_session(agent.address, session=f"trunc{cut}")
    frame = b"".join(bytes(p) for p in encode_frame({"op": "sync", "pad": "x" * 30}))
    s.sendall(frame[:cut])
    s.close()  # hang up mid-frame
    assert still_serving(agent.address)


def test_unknown_requests_and_bad_ids_get_clear_errors(agent):
    s = open_session(agent.address, session="confused")
    try:
        assert "unknown request" in request(s, {"op": "format_disk"})["error"]["message"]
        assert "unknown tensor id" in request(s, {"op": "fetch", "t": 99999})["error"]["message"]
        reply = request(s, {"op": "fetch", "t": 99999, "item": True})
        assert "unknown tensor id" in reply["error"]["message"]
        reply = request(s, {"op": "fetch", "t": 1, "item": "yes"})
        assert "'item' must be a boolean" in reply["error"]["message"]
        reply = request(s, {"op": "fetch", "t": "1; rm -rf /"})
        assert "'t' must be an integer" in reply["error"]["message"]
        reply = request(s, {"op": "manual_seed", "seed": "x"})
        assert "integer" in reply["error"]["message"]
        for device in (7, -1):
            reply = request(s, {"op": "get_rng_state", "device": device})
            assert "no device" in reply["error"]["message"], reply
        for device in ("0", None, True):
            reply = request(s, {"op": "get_rng_state", "device": device})
            assert "'device' must be an integer" in reply["error"]["message"], reply
        assert request(s, {"op": "set_rng_state", "device": 0})["error"]["type"] == "ProtocolError"
        garbage = request(s, {"op": "set_rng_state", "device": 0}, [b"\x00" * 7])
        assert garbage["error"]["op"] is None and "Traceback" not in garbage["error"]["message"]
        assert request(s, {"op": "get_rng_state", "device": 0}).get("ok")
        assert request(s, {"op": "sync"}).get("ok")
    finally:
        s.close()


def test_header_must_be_a_json_object(agent):
    s = open_session(agent.address, session="notjson")
    head = b"\xff\xfe not json"
    s.sendall(struct.pack("<II", len(head), 0) + head)
    reply, _ = recv_frame(s)
    assert "JSON" in reply["error"]["message"]
    s.close()
    head = json.dumps([1, 2]).encode()
    s = open_session(agent.address, session="notobj")
    s.sendall(struct.pack("<II", len(head), 0) + head)
    assert "object" in recv_frame(s)[0]["error"]["message"]
    s.close()


def test_an_open_mode_hello_asks_only_for_gpus_the_agent_has(agent):
    for fraction, words in [
        (1e9, "needs 1000000000 GPUs; this agent has"),
        (1.5, "fits no GPU"),
        (-1, "fits no GPU"),
    ]:
        s = connect(agent.address)
        try:
            send_frame(
                s,
                {
                    "op": "hello",
                    "session": f"greedy-{fraction}",
                    "secret": "x",
                    "fraction": fraction,
                },
            )
            reply, _ = recv_frame(s)
            assert words in reply["error"]["message"], reply
        finally:
            s.close()
    still_serving(agent.address)


# -- signature records (protocol/messages.py SigDef / SigUse) ---------------------------------

ONES = {
    "sig": 0,
    "name": "aten::ones.default",
    "args": [[3]],
    "kwargs": {"device": {"dev": "cuda", "i": 0}},
    "out": 1,
}
NEG = {"sig": 1, "name": "aten::neg.default", "args": [{"hole": "t"}], "kwargs": {}, "out": 1}


def sig_batch(sigs, ops):
    return {"op": "batch", "sigs": sigs, "ops": ops, "free": []}


def sync_error(s) -> str:
    reply = request(s, {"op": "sync"})
    assert "error" in reply and "Traceback" not in reply["error"]["message"], reply
    return reply["error"]["message"]


def fetched(s, rid) -> list:
    send_frame(s, {"op": "fetch", "t": rid})
    reply, bufs = recv_frame(s)
    assert reply.get("ok"), reply
    return torch.frombuffer(bytearray(bufs[0]), dtype=torch.float32).tolist()


def test_signatures_belong_to_one_session_and_one_connection(agent):
    a = open_session(agent.address, session="sig-alice", secret="a")
    b = open_session(agent.address, session="sig-bob", secret="b")
    try:
        send_frame(a, sig_batch([ONES, NEG], [[0, 1], [1, 1, 2]]))
        assert fetched(a, 2) == [-1.0] * 3
        # Bob never defined them: alice's signatures name nothing in his session.
        send_frame(b, sig_batch([], [[0, 5], [1, 1, 6]]))
        assert "unknown signature 0" in sync_error(b)
        # His own table is his: defining 0 there leaves alice's 0 alone, and his uses still
        # reach only his tensors.
        send_frame(b, sig_batch([{**NEG, "sig": 0}], [[0, 2, 3]]))
        assert "unknown tensor id 2" in sync_error(b)
        send_frame(a, sig_batch([], [[0, 3]]))
        assert fetched(a, 3) == [1.0] * 3
        # A new connection of alice's session starts with an empty table; her tensors stay.
        a.close()
        a = open_session(agent.address, session="sig-alice", secret="a")
        send_frame(a, sig_batch([], [[1, 3, 4]]))
        assert "unknown signature 1" in sync_error(a)
        send_frame(a, sig_batch([ONES, NEG], [[1, 3, 4]]))  # sent again, as the client does
        assert fetched(a, 4) == [-1.0] * 3
    finally:
        a.close()
        b.close()
    assert still_serving(agent.address)


def test_malformed_signature_records_get_clear_errors(agent):
    s = open_session(agent.address, session="sig-confused")
    try:
        send_frame(s, {"op": "batch", "sigs": {"sig": 0}, "ops": []})
        assert "'sigs' must be a list" in sync_error(s)  # refused before it runs
        for sigs, words in [
            ([{**NEG, "sig": 5}], "out of order"),
            ([{**NEG, "sig": 0, "args": [{"t": 1}]}], "no tensor ids"),
            ([{**NEG, "sig": 0, "args": [{"hole": "pickle"}]}], "unknown hole"),
            ([{**NEG, "sig": 0, "out": "1"}], "output count"),
            ([{**NEG, "sig": 0, "name": ["aten::neg.default"]}], "needs a name"),
            ([{**NEG, "sig": 0, "args": [[[[[[[[1]]]]]]]]}], "nests deeper"),
            ([[0, "aten::neg.default", [], {}, 1]], "a signature must be"),
        ]:
            send_frame(s, sig_batch(sigs, []))
            assert words in sync_error(s), sigs
        send_frame(s, sig_batch([ONES, NEG], [[0, 1]]))
        assert request(s, {"op": "sync"}).get("ok")
        for ops, words in [
            ([[1]], "takes 1 holes and 1 output ids"),
            ([[2, 1, 2]], "unknown signature 2"),
            ([[1, "1", 2]], "tensor id must be an integer"),
            ([[1, 1.0, 2]], "tensor id must be an integer"),
            ([[1, 1, 2, "3"]], "free ids must be integers"),
            ([[1, 77, 2]], "unknown tensor id 77"),
            ([[1, 1, -2]], "bad output id"),
        ]:
            send_frame(s, sig_batch([], ops))
            assert words in sync_error(s), ops
        assert fetched(s, 1) == [1.0] * 3  # nothing above touched the session's tensors
    finally:
        s.close()
    assert still_serving(agent.address)


def test_random_signature_uses_get_errors_and_never_end_the_session(agent):
    import random

    rng = random.Random(15)
    junk = [0, 1, 2, -1, 1 << 62, 0.5, float("inf"), "x", None, True, [1], {"t": 1}, {}]
    s = open_session(agent.address, session="sig-fuzz")
    try:
        send_frame(s, sig_batch([ONES, NEG], [[0, 1]]))
        for _ in range(60):
            rec = [rng.choice([0, 1, 2, -1])] + rng.choices(junk, k=rng.randrange(0, 5))
            send_frame(s, sig_batch([], [rec]))
            reply = request(s, {"op": "sync"})
            assert reply.get("ok") or "Traceback" not in reply["error"]["message"], rec
        send_frame(s, sig_batch([], [[0, 1000]]))  # the session and its table still work
        assert fetched(s, 1000) == [1.0] * 3
    finally:
        s.close()
    assert still_serving(agent.address)


def test_a_huge_signature_table_is_refused_and_the_session_goes_on(agent):
    from jupyter_elastic_gpu.protocol import messages as m

    s = open_session(agent.address, session="sig-hoarder")
    big = [0] * (m.SIG_DEF_SIZE_MAX - 3)  # the largest definition allowed
    fits = m.SIG_SIZE_MAX // m.SIG_DEF_SIZE_MAX
    try:
        for first in range(0, fits, 16):
            defs = [
                {"sig": n, "name": "aten::zeros.default", "args": [big], "kwargs": {}, "out": 1}
                for n in range(first, first + 16)
            ]
            send_frame(s, sig_batch(defs, []))
        assert request(s, {"op": "sync"}).get("ok")
        send_frame(s, sig_batch([{**NEG, "sig": fits}], []))
        assert "table is full" in sync_error(s)
        send_frame(s, sig_batch([{**NEG, "sig": 0, "args": [big + [0]]}], []))
        assert "template values; at most" in sync_error(s)
        send_frame(s, sig_batch([ONES], [[0, 1]]))  # a definition numbered 0 starts afresh
        assert fetched(s, 1) == [1.0] * 3
    finally:
        s.close()
    assert still_serving(agent.address)


def test_a_batch_refused_for_want_of_a_lease_still_defines_its_signatures(agent):
    # The client counts a batch's definitions as sent once the batch is; were they dropped with
    # its ops, every later use of them would fail until the next connection.
    s = open_session(agent.address, session="sig-detached")
    try:
        assert request(s, {"op": "detach"}).get("ok")
        send_frame(s, sig_batch([ONES], [[0, 1]]))
        hello = {"op": "hello", "session": "sig-detached", "secret": "s3cret", "token": None}
        assert request(s, hello).get("ok")
        assert "no GPU lease" in sync_error(s)  # the batch's ops were refused...
        send_frame(s, sig_batch([], [[0, 2]]))  # ...its definition was not
        assert fetched(s, 2) == [1.0] * 3
    finally:
        s.close()
