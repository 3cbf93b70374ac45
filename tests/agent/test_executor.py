"""The executor's op loop, in-process: what a batch of records does to a session's tensors.

These pin down the behaviour the hot path (per-name plans, the inlined one-tensor store, the
CUDA agent's accounting on demand) must keep."""

from __future__ import annotations

import pytest
import torch

from jupyter_elastic_gpu.agent.executor import SessionExecutor

CPU = torch.device("cpu")


def t(rid):
    return {"t": rid}


def run(ex, *records, bufs=(), interrupted=lambda: False):
    ex.run_batch(
        [list(r) if isinstance(r, tuple) else r for r in records], list(bufs), [], interrupted
    )


@pytest.fixture(params=["cpu agent", "cuda-style accounting"])
def ex(request):
    ex = SessionExecutor([CPU])
    # A CUDA agent leaves the cap and per-op byte counts to the allocator; the same executor
    # on CPU tensors runs that path.
    ex.accounting = request.param == "cpu agent"
    return ex


def test_ops_run_on_the_sessions_tensors_and_keep_their_results(ex):
    run(
        ex,
        ("aten::ones.default", [[2, 3]], {"dtype": {"dt": "float32"}}, [1], 0),
        ("aten::add.Tensor", [t(1), t(1)], {"alpha": 2}, [2], 0),
        ("aten::mul.Tensor", [t(2), 0.5], {}, [3], 0),
    )
    assert ex.error is None
    assert torch.equal(ex.tensors[3], torch.full((2, 3), 1.5))


def test_a_reused_id_replaces_its_tensor(ex):
    run(
        ex,
        ("aten::ones.default", [[4]], {}, [1], 0),
        ("aten::zeros.default", [[8]], {}, [1], 0),
    )
    assert ex.tensors[1].shape == (8,) and ex.in_use == 8 * 4


def test_lists_of_tensor_ids_and_sizes_decode_at_any_depth(ex):
    run(
        ex,
        ("aten::ones.default", [[2]], {}, [1], 0),
        ("aten::ones.default", [[3]], {}, [2], 0),
        ("aten::_foreach_add.Scalar", [[t(1), t(2)], 1.0], {}, [3, 4], 0),
        ("aten::cat.default", [[t(3), t(4)]], {"dim": 0}, [5], 0),
    )
    assert ex.error is None
    assert torch.equal(ex.tensors[5], torch.full((5,), 2.0))


def test_ops_that_write_into_an_input_give_it_no_new_id(ex):
    run(
        ex,
        ("aten::zeros.default", [[3]], {}, [1], 0),
        ("aten::add_.Scalar", [t(1), 2], {}, [0], 0),
    )
    assert ex.error is None and set(ex.tensors) == {1}
    assert torch.equal(ex.tensors[1], torch.full((3,), 2.0))


def test_in_use_counts_each_storage_once_however_many_views(ex):
    run(
        ex,
        ("aten::zeros.default", [[10]], {}, [1], 0),
        ("aten::view.default", [t(1), [2, 5]], {}, [2], 0),
        ("aten::zeros.default", [[6]], {"dtype": {"dt": "float64"}}, [3], 0),
    )
    assert ex.in_use == 10 * 4 + 6 * 8
    ex.free([1, 3])
    assert ex.in_use == 10 * 4  # the view keeps its storage alive
    ex.free([2])
    assert ex.in_use == 0 and ex.tensors == {}


def test_a_refused_op_is_refused_every_time_and_its_outputs_are_never_made(ex):
    for _ in range(2):
        run(ex, ("aten::from_file.default", ["/etc/passwd"], {}, [1], 0))
        err = ex.take_error()
        assert err["type"] == "PermissionError" and "not allowed" in err["message"]
        run(ex, ("aten::clone.default", [t(1)], {}, [2], 0))
        assert "never produced" in ex.take_error()["message"]


def test_malformed_names_and_unknown_ids_are_clear_errors(ex):
    run(ex, (["aten::add.Tensor"], [], {}, [1], 0))
    assert "malformed op name" in ex.take_error()["message"]
    run(ex, ("aten::neg.default", [t(77)], {}, [1], 0))
    assert "unknown tensor id 77" in ex.take_error()["message"]
    run(ex, ("aten::ones.default", [[2]], {"dtype": {"dt": ["float32"]}}, [1], 0))
    assert "unknown dtype" in ex.take_error()["message"]


def test_the_first_failure_is_kept_and_later_ops_still_run(ex):
    run(
        ex,
        ("aten::ones.default", [[2]], {}, [1], 0),
        ("aten::mm.default", [t(1), t(1)], {}, [2], 0),  # 1-d operands: fails
        ("aten::neg.default", [t(1)], {}, [3], 0),
    )
    err = ex.take_error()
    assert err["op"] == "aten::mm.default" and err["deferred"]
    assert 2 not in ex.tensors and torch.equal(ex.tensors[3], -torch.ones(2))


def test_an_interrupt_skips_the_rest_of_the_batch():
    ex = SessionExecutor([CPU])
    polls = []

    def interrupted():
        polls.append(1)
        return len(polls) > 1

    records = [("aten::ones.default", [[1]], {}, [i], 0) for i in range(1, 41)]
    run(ex, *records, interrupted=interrupted)
    assert ex.cancelled and 1 in ex.tensors and 40 not in ex.tensors
    run(ex, ("aten::neg.default", [t(40)], {}, [41], 0))
    assert "never produced" in ex.take_error()["message"]


def test_a_cpu_agent_refuses_a_factory_over_the_slice_before_allocating():
    ex = SessionExecutor([CPU])
    ex.cap_bytes = 1 << 20
    run(ex, ("aten::empty.memory_format", [[1 << 30]], {}, [1], 0))
    err = ex.take_error()
    assert err["type"] == "OutOfMemoryError" and "slice" in err["message"]
    assert ex.tensors == {} and ex.in_use == 0


def test_a_cpu_agent_refuses_a_result_over_the_slice():
    ex = SessionExecutor([CPU])
    ex.cap_bytes = 1 << 20
    run(
        ex,
        ("aten::ones.default", [[1 << 17]], {}, [1], 0),  # 512 KiB
        ("aten::mul.Tensor", [t(1), 2], {}, [2], 0),  # 1 MiB in all: at the cap
        ("aten::add.Tensor", [t(1), 2], {}, [3], 0),  # over it
    )
    assert ex.take_error()["type"] == "OutOfMemoryError"
    assert set(ex.tensors) == {1, 2} and ex.in_use == 1 << 20


def test_call_returns_input_ids_new_tensors_and_values(ex):
    run(ex, ("aten::arange.default", [4], {"dtype": {"dt": "float32"}}, [1], 0))
    same = ex.call("aten::detach_.default", [t(1)], {}, [])
    assert same == {"t": 1}
    new = ex.call("aten::nonzero.default", [t(1)], {}, [])
    assert new["new"] < 0 and new["size"] == [3, 1] and new["new"] in ex.tensors
    assert ex.call("aten::_local_scalar_dense.default", [t(1)], {}, []) == 0.0


@pytest.mark.parametrize("which", ["dy", "x"])
def test_group_norm_backward_is_right_when_the_agents_layouts_differ(ex, which):
    # The client's autograd asked for both contiguous (a no-op by its meta strides), but a
    # oneDNN convolution_backward may have left the agent's dy channels_last: the CPU kernel,
    # given two layouts, would silently return a wrong gradient.
    g = torch.Generator().manual_seed(0)  # not torch.manual_seed: this process may hold the
    # client's CUDA facade from an earlier test, which would seed a remote GPU too
    x, dy = torch.randn(2, 32, 8, 8, generator=g), torch.randn(2, 32, 8, 8, generator=g)
    w = torch.randn(32, generator=g)
    _, mean, rstd = torch.ops.aten.native_group_norm(x, w, None, 2, 32, 64, 8, 1e-5)
    want = torch.ops.aten.native_group_norm_backward(
        dy, x, mean, rstd, w, 2, 32, 64, 8, [True, True, True]
    )
    held = {"dy": dy, "x": x}
    held[which] = held[which].contiguous(memory_format=torch.channels_last)
    ex.tensors.update({1: held["dy"], 2: held["x"], 3: mean, 4: rstd, 5: w})
    run(
        ex,
        (
            "aten::native_group_norm_backward.default",
            [t(1), t(2), t(3), t(4), t(5), 2, 32, 64, 8, [True, True, True]],
            {},
            [6, 7, 8],
            0,
        ),
    )
    assert ex.error is None
    for rid, expected in zip((6, 7, 8), want, strict=True):
        torch.testing.assert_close(ex.tensors[rid], expected)
