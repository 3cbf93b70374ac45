"""Signature records in the executor, in-process: a definition, then uses that carry only what
changes (protocol/messages.py ``SigDef``/``SigUse``), and every way a use can be wrong."""

from __future__ import annotations

import pytest
import torch

from jupyter_elastic_gpu.agent.executor import SessionExecutor
from jupyter_elastic_gpu.protocol import messages as m
from jupyter_elastic_gpu.protocol.messages import HOLE_FLOAT as F
from jupyter_elastic_gpu.protocol.messages import HOLE_TENSOR as T

CPU = torch.device("cpu")


@pytest.fixture(params=["cpu agent", "cuda-style accounting"])
def ex(request):
    ex = SessionExecutor([CPU])
    ex.accounting = request.param == "cpu agent"
    return ex


def define(ex, *defs):
    ex.define_signatures([m.SigDef(*d).wire() for d in defs])


def run(ex, *records, interrupted=lambda: False):
    ex.run_batch([list(r) for r in records], [], [], interrupted)


def put(ex, rid, value):
    ex.tensors[rid] = torch.as_tensor(value, dtype=torch.float32)


def error(ex) -> dict:
    err = ex.take_error()
    assert err is not None
    return err


def test_uses_fill_tensor_and_float_holes_in_order(ex):
    put(ex, 1, [1.0, 2.0])
    put(ex, 2, [10.0, 20.0])
    define(
        ex,
        (0, "aten::add.Tensor", [T, T], {"alpha": F}, 1),
        (1, "aten::mul.Scalar", [T, F], {}, 1),
        (2, "aten::view.default", [T, [2, 1]], {}, 1),
    )
    run(ex, (0, 1, 2, 0.5, 3), (1, 3, 4.0, 4), (2, 4, 5), (0, 2, 1, 2.0, 6))
    assert ex.take_error() is None
    assert ex.tensors[3].tolist() == [6.0, 12.0]  # 1 + 0.5 * 10
    assert ex.tensors[4].tolist() == [24.0, 48.0]
    assert ex.tensors[5].shape == (2, 1)
    assert ex.tensors[6].tolist() == [12.0, 24.0]  # 10 + 2 * 1


def test_tensor_lists_and_mixed_lists_are_holes_too(ex):
    for rid in (1, 2, 3):
        put(ex, rid, [float(rid)])
    define(
        ex,
        (0, "aten::cat.default", [[T, T, T]], {}, 1),
        (1, "aten::_foreach_add.Scalar", [[T, T]], {"scalar": F}, 2),
        (2, "aten::stack.default", [[T, T]], {"dim": 0}, 1),
    )
    run(ex, (0, 1, 2, 3, 10), (1, 1, 3, 0.5, 11, 12), (2, 11, 12, 13))
    assert ex.take_error() is None
    assert ex.tensors[10].tolist() == [1.0, 2.0, 3.0]
    assert ex.tensors[11].tolist() == [1.5] and ex.tensors[12].tolist() == [3.5]
    assert ex.tensors[13].tolist() == [[1.5], [3.5]]


def test_constants_decode_once_and_kwargs_stay_fresh_per_use(ex):
    define(
        ex,
        (
            0,
            "aten::ones.default",
            [[2]],
            {"dtype": {"dt": "float64"}, "device": {"dev": "cuda"}},
            1,
        ),
    )
    run(ex, (0, 1), (0, 2))
    assert ex.take_error() is None
    assert ex.tensors[1].dtype == ex.tensors[2].dtype == torch.float64
    assert ex.tensors[1] is not ex.tensors[2]


def test_ids_freed_on_a_use_are_freed_before_the_op_runs(ex):
    put(ex, 1, [1.0])
    put(ex, 2, [2.0])
    define(ex, (0, "aten::neg.default", [T], {}, 1))
    # x = -x: each use frees the input the previous one replaced.
    run(ex, (0, 1, 3), (0, 3, 4, 1), (0, 4, 5, 3, 2))
    assert ex.take_error() is None
    assert sorted(ex.tensors) == [4, 5]
    assert ex.tensors[5].tolist() == [-1.0]


def test_an_interrupted_use_still_frees_and_never_makes_its_outputs(ex):
    put(ex, 1, [1.0])
    put(ex, 2, [2.0])
    define(ex, (0, "aten::neg.default", [T], {}, 1))
    run(ex, (0, 1, 3, 2), interrupted=lambda: True)
    assert 2 not in ex.tensors and 3 not in ex.tensors
    run(ex, (0, 3, 4))
    assert "never produced" in error(ex)["message"]


@pytest.mark.parametrize(
    "record, words",
    [
        ((7, 1, 2), "unknown signature 7"),
        ((-1, 1, 2), "unknown signature -1"),
        ((0, 1), "takes 1 holes and 1 output ids"),
        ((0, 1, 2, "x"), "free ids must be integers"),
        ((0, 1, 2, [3]), "free ids must be integers"),
    ],
)
def test_malformed_uses_are_protocol_errors(ex, record, words):
    put(ex, 1, [1.0])
    define(ex, (0, "aten::neg.default", [T], {}, 1))
    with pytest.raises(m.ProtocolError, match=words):
        run(ex, record)


@pytest.mark.parametrize(
    "hole, words",
    [
        ("1", "tensor id must be an integer"),
        (1.0, "tensor id must be an integer"),
        (True, "tensor id must be an integer"),
        ([1], "tensor id must be an integer"),
        (None, "tensor id must be an integer"),
        ({"t": 1}, "tensor id must be an integer"),
        (99, "unknown tensor id 99"),
    ],
)
def test_a_tensor_hole_takes_only_an_id_of_this_session(ex, hole, words):
    put(ex, 1, [1.0])
    define(ex, (0, "aten::neg.default", [T], {}, 1), (1, "aten::cat.default", [[T, T]], {}, 1))
    run(ex, (0, hole, 2), (1, 1, hole, 3), (0, 2, 4), (0, 3, 5))
    assert words in error(ex)["message"]
    assert not {2, 3, 4, 5} & set(ex.tensors)  # none was made, nor anything from them
    assert {2, 3, 4, 5} <= ex.failed


@pytest.mark.parametrize("value", ["0.5", None, [0.5], {"c": [1, 2]}, True])
def test_a_float_hole_takes_only_a_number(ex, value):
    put(ex, 1, [1.0])
    define(ex, (0, "aten::mul.Scalar", [T, F], {}, 1))
    run(ex, (0, 1, value, 2))
    assert "float hole" in error(ex)["message"]
    assert 2 not in ex.tensors


def test_a_refused_op_or_constant_fails_every_use_with_its_own_error(ex):
    put(ex, 1, [1.0])
    define(
        ex,
        (0, "aten::from_file.default", [T], {}, 1),
        (1, "os::system.default", [T], {}, 1),
        (2, "aten::ones.default", [[1]], {"device": {"dev": "cuda", "i": 3}}, 1),
        (3, "aten::neg.default", [T], {}, 1),
    )
    for rec, words in [
        ((0, 1, 2), "not allowed"),
        ((1, 1, 3), "outside the allowed namespaces"),
        ((2, 4), "outside this session's 1 GPU"),
        ((0, 1, 5), "not allowed"),
    ]:
        run(ex, rec)
        assert words in error(ex)["message"]
        assert rec[-1] in ex.failed
    run(ex, (3, 1, 6))  # the table's other signatures are unharmed
    assert ex.take_error() is None and ex.tensors[6].tolist() == [-1.0]


@pytest.mark.parametrize(
    "args, words",
    [
        ([{"t": 1}], "no tensor ids or buffers"),
        ([{"cpu": 0, "dtype": "float32", "shape": [1]}], "no tensor ids or buffers"),
        ([{"hole": "x"}], "unknown hole"),
        ([{"hole": "t", "x": 1}], "unknown hole"),
        ([[[[[[[[1]]]]]]]], "nests deeper"),
    ],
)
def test_templates_that_leave_the_holes_in_doubt_are_refused(ex, args, words):
    with pytest.raises(m.ProtocolError, match=words):
        define(ex, (0, "aten::neg.default", args, {}, 1))


@pytest.mark.parametrize(
    "raw, words",
    [
        ({"sig": 0, "name": "aten::neg.default", "args": [], "kwargs": {}}, "a signature must be"),
        ({"sig": "0", "name": "x", "args": [], "kwargs": {}, "out": 1}, "outside 0.."),
        ({"sig": True, "name": "x", "args": [], "kwargs": {}, "out": 1}, "outside 0.."),
        ({"sig": m.SIG_MAX, "name": "x", "args": [], "kwargs": {}, "out": 1}, "outside 0.."),
        ({"sig": 0, "name": 5, "args": [], "kwargs": {}, "out": 1}, "needs a name"),
        ({"sig": 0, "name": "x", "args": {}, "kwargs": {}, "out": 1}, "needs a name"),
        ({"sig": 0, "name": "x", "args": [], "kwargs": {}, "out": -1}, "output count"),
        ([0, "aten::neg.default", [], {}, 1], "a signature must be"),
    ],
)
def test_malformed_definitions_are_refused(ex, raw, words):
    with pytest.raises(m.ProtocolError, match=words):
        ex.define_signatures([raw])
    with pytest.raises(m.ProtocolError, match="must be a list"):
        ex.define_signatures({"sig": 0})


def test_definitions_are_numbered_in_order_and_zero_starts_afresh(ex):
    put(ex, 1, [1.0])
    with pytest.raises(m.ProtocolError, match="out of order"):
        define(ex, (1, "aten::neg.default", [T], {}, 1))
    define(ex, (0, "aten::neg.default", [T], {}, 1), (1, "aten::exp.default", [T], {}, 1))
    with pytest.raises(m.ProtocolError, match="out of order"):
        define(ex, (3, "aten::neg.default", [T], {}, 1))
    define(ex, (0, "aten::exp.default", [T], {}, 1))  # a new table: 1 is gone
    run(ex, (0, 1, 2))
    assert ex.tensors[2].tolist() == pytest.approx([2.718281828])
    with pytest.raises(m.ProtocolError, match="unknown signature 1"):
        run(ex, (1, 1, 3))


def test_a_new_connection_starts_with_an_empty_table(ex):
    put(ex, 1, [1.0])
    define(ex, (0, "aten::neg.default", [T], {}, 1))
    ex.reset_signatures()
    with pytest.raises(m.ProtocolError, match="unknown signature 0"):
        run(ex, (0, 1, 2))


def test_the_table_is_bounded_in_signatures_and_template_values(ex, monkeypatch):
    big = [0] * (m.SIG_DEF_SIZE_MAX - 3)  # in args, beside empty kwargs: the most allowed
    define(ex, (0, "aten::zeros.default", [big], {}, 1))
    with pytest.raises(m.ProtocolError, match="template values; at most"):
        define(ex, (1, "aten::zeros.default", [big + [0]], {}, 1))
    monkeypatch.setattr(
        "jupyter_elastic_gpu.agent.executor.SIG_SIZE_MAX", 2 * m.SIG_DEF_SIZE_MAX + 9
    )
    define(ex, (1, "aten::zeros.default", [big], {}, 1))
    with pytest.raises(m.ProtocolError, match="table is full"):
        define(ex, (2, "aten::zeros.default", [big], {}, 1))
    define(ex, (0, "aten::neg.default", [T], {}, 1))  # starting afresh frees the room
    define(ex, (1, "aten::zeros.default", [big], {}, 1), (2, "aten::zeros.default", [big], {}, 1))
    # Ids stop at SIG_MAX: the client starts afresh before it gets there.
    with pytest.raises(m.ProtocolError, match="outside 0.."):
        ex.define_signatures(
            [{"sig": m.SIG_MAX, "name": "aten::neg.default", "args": [T], "kwargs": {}, "out": 1}]
        )


def test_a_use_gives_what_the_same_run_record_gives(ex):
    a = torch.randn(3, 4)
    ex.tensors[1] = a
    define(ex, (0, "aten::sum.dim_IntList", [T, [1]], {"keepdim": True}, 1))
    ex.run_batch(
        [[0, 1, 2], ["aten::sum.dim_IntList", [{"t": 1}, [1]], {"keepdim": True}, [3], 0]], []
    )
    assert ex.take_error() is None
    assert torch.equal(ex.tensors[2], ex.tensors[3])
    assert torch.equal(ex.tensors[2], a.sum(1, keepdim=True))


def test_wire_shapes():
    d = m.SigDef(3, "aten::add.Tensor", [T, T], {"alpha": F}, 1)
    assert d.wire() == {
        "sig": 3,
        "name": "aten::add.Tensor",
        "args": [{"hole": "t"}, {"hole": "t"}],
        "kwargs": {"alpha": {"hole": "f"}},
        "out": 1,
    }
    assert m.parse_sig_def(d.wire()) == d
    assert m.SigUse(3, [7, 8, 0.5], [9], [4, 5]).wire() == [3, 7, 8, 0.5, 9, 4, 5]
    assert m.template_size([T, [1, 2]]) == 6 and m.template_size({"alpha": F}) == 3
    batch = m.parse({"op": "batch", "ops": [], "sigs": [d.wire()]})
    assert batch.sigs == [d.wire()]
    with pytest.raises(m.ProtocolError, match="sigs"):
        m.parse({"op": "batch", "ops": [], "sigs": {"sig": 0}})


def test_long_strings_count_against_the_table_by_their_length(ex):
    assert m.template_size("mean") == 1 and m.template_size("x" * 160) == 11
    with pytest.raises(m.ProtocolError, match="template values; at most"):
        define(ex, (0, "aten::neg.default", [T, "x" * (16 * m.SIG_DEF_SIZE_MAX)], {}, 1))
