"""The protocol package as a specification: declared messages, their validation and the value
codec, in process (no agent start), and the promise that torch-free processes stay torch-free."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from jupyter_elastic_gpu.protocol import messages as m
from jupyter_elastic_gpu.protocol.values import ArgumentDecoder, decode_result, encode_result


def test_server_extension_agent_and_provisioner_never_import_torch():
    code = (
        "import sys, jupyter_elastic_gpu.serverext, jupyter_elastic_gpu.agent.server, "
        "jupyter_elastic_gpu.provisioner.provisioner, jupyter_elastic_gpu.protocol.client; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_every_request_round_trips_through_its_declaration():
    msg = m.Hello(session="s1", secret="x", token=None, fraction=0.5, pid=3)
    assert m.parse(msg.header()) == msg
    assert m.parse({"op": "batch", "ops": []}) == m.Batch(ops=[], free=[], epoch=0)


@pytest.mark.parametrize(
    "header, words",
    [
        ({"op": "format_disk"}, "unknown request"),
        ({"op": ["hello"]}, "unknown request"),
        ({"op": "hello", "session": "", "secret": "x"}, "session id"),
        ({"op": "hello", "session": "a" * 129, "secret": "x"}, "session id"),
        ({"op": "hello", "session": "a"}, "needs 'secret'"),
        ({"op": "fetch", "t": "1; rm -rf /"}, "'t' must be an integer"),
        ({"op": "fetch", "t": True}, "'t' must be an integer"),
        ({"op": "batch", "ops": {}}, "'ops' must be a list"),
        ({"op": "batch", "ops": [], "free": [1, "2"]}, "list of integers"),
        ({"op": "get_rng_state", "device": None}, "'device' must be an integer"),
    ],
)
def test_malformed_requests_are_refused_with_a_reason(header, words):
    with pytest.raises(m.ProtocolError, match=words):
        m.parse(header)


def test_a_reader_serves_only_the_requests_it_declares():
    with pytest.raises(m.ProtocolError, match="unknown request"):
        m.parse({"op": "sync"}, accept=(m.Hello, m.Inventory))


@pytest.mark.parametrize(
    "rec, words",
    [
        (["-", [1]], "each op must be"),
        ({"free": [1], "x": 1}, "each op must be"),
        ({"free": ["a"]}, "list of ids"),
        (["aten::add.Tensor", {}, {}, [1], 0], "list and an object"),
        (["aten::add.Tensor", [], {}, [1], -1], "buffer base"),
        (["aten::add.Tensor", [], {}, [True], 0], "output ids"),
    ],
)
def test_bad_batch_records_are_refused(rec, words):
    with pytest.raises(m.ProtocolError, match=words):
        m.parse_record(rec)


def test_batch_records_are_declared_types():
    rec = ["aten::add.Tensor", [], {}, [4], 0]
    assert m.Run(*m.parse_record(rec)) == m.Run("aten::add.Tensor", [], {}, [4], 0)
    assert m.parse_record({"free": [1, 2]}) == m.Free([1, 2])


def _decoder():
    table = {1: torch.ones(2)}

    def lookup(rid):
        if type(rid) is not int or rid not in table:  # as the executor's: True is no id
            raise m.ProtocolError(f"unknown tensor id {rid!r}")
        return table[rid]

    return ArgumentDecoder(table, lookup, [torch.device("cpu")])


@pytest.mark.parametrize(
    "value, words",
    [
        ({"t": 1, "dt": "float32"}, "exactly one tag"),
        ({"zz": 1}, "exactly one tag"),
        ({"t": 2}, "unknown tensor id"),
        ({"dt": "evil"}, "unknown dtype"),
        ({"dev": "cuda", "i": 1}, "outside this session"),
        ({"dev": "cuda", "i": "0"}, "outside this session"),
        ({"cpu": 3, "dtype": "float32", "shape": [1]}, "out of range"),
        ({"cpu": 0, "dtype": "float32", "shape": [1 << 40]}, "needs"),
        ({"mf": "__class__"}, "unknown mf"),
        ({"c": ["1", 2]}, "complex"),
        ((1, 2), "unexpected value"),
    ],
)
def test_hostile_values_are_refused_in_process(value, words):
    with pytest.raises(m.ProtocolError, match=words):
        _decoder()(value, [b"\0" * 4])
    # The per-op fast path over an argument list refuses exactly what the full decoder does.
    with pytest.raises(m.ProtocolError, match=words):
        _decoder().args([1.5, value], [b"\0" * 4])


def test_argument_list_fast_path_resolves_ids_only_in_its_own_table():
    dec = _decoder()
    got = dec.args([{"t": 1}, 2, None, True, {"dt": "int8"}], [])
    assert got[0] is dec.tensors[1] and got[1:] == [2, None, True, torch.int8]
    for foreign in ({"t": "1"}, {"t": 1.0}, {"t": True}):
        with pytest.raises(m.ProtocolError, match="unknown tensor id"):
            dec.args([foreign], [])


def test_values_decode_to_what_they_name():
    dec = _decoder()
    got = dec(
        [{"t": 1}, {"dt": "bfloat16"}, {"c": [1, 2]}, {"cpu": 0, "dtype": "int32", "shape": [1]}],
        [b"\1\0\0\0"],
    )
    assert got[0] is dec.lookup(1) and got[1] is torch.bfloat16 and got[2] == 1 + 2j
    assert got[3].tolist() == [1]


def test_call_results_round_trip_between_agent_and_client():
    x, kept = torch.ones(3), {}

    def store(t):
        kept[-1] = t
        return -1, 0

    wire = encode_result(
        (x, torch.zeros(2, 2), 5, torch.int8), lambda t: 7 if t is x else None, store
    )
    back = decode_result(wire, {7: "input-7"}, lambda rid, *meta: ("new", rid, meta[0]))
    assert back == ("input-7", ("new", -1, [2, 2]), 5, torch.int8)
