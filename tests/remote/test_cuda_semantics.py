"""Code written for a local CUDA GPU behaves the same against the remote one."""

from __future__ import annotations

import io
import json
import os

import pytest
import torch
import torch.nn as nn

from tests.conftest import AGENT_DEVICE


def test_torch_cuda_reports_the_remote_gpu(remote):
    assert torch.cuda.is_available()
    assert torch.cuda.device_count() == 1
    assert torch.cuda.current_device() == 0
    props = torch.cuda.get_device_properties(0)
    assert props.name == torch.cuda.get_device_name() and props.total_memory > 0
    assert torch.cuda.get_device_capability() == (props.major, props.minor)
    torch.cuda.synchronize()


def test_tensors_say_cuda(remote):
    x = torch.randn(2, 3, device="cuda")
    assert x.is_cuda and x.device == torch.device("cuda", 0) and x.device.type == "cuda"
    assert torch.zeros(2, device=torch.device("cuda")).is_cuda
    assert torch.tensor([1, 2], device="cuda:0").tolist() == [1, 2]
    assert torch.ones(3).cuda().sum().item() == 3
    assert torch.ones(3).to("cuda").is_cuda and torch.ones(3).to(0).is_cuda
    assert not x.cpu().is_cuda and x.cpu().device.type == "cpu"
    assert x.new_zeros(4).is_cuda and torch.zeros_like(x).is_cuda
    assert torch.arange(5, device="cuda").tolist() == list(range(5))


def test_values_round_trip_exactly(remote):
    for dtype in (
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.uint8,
        torch.bool,
        torch.complex64,
    ):
        x = (torch.randn(5, 7) * 100).to(dtype)
        assert torch.equal(x.cuda().cpu(), x), dtype
    t = torch.randn(4, 6).t()  # non-contiguous layouts keep their strides, as with CUDA
    r = t.cuda()
    assert r.stride() == t.stride() and torch.equal(r.cpu(), t)
    assert torch.equal(torch.empty(0, 3).cuda().cpu(), torch.empty(0, 3))
    assert torch.tensor(3.5).cuda().item() == 3.5


def test_item_gives_the_value_and_type_a_local_gpu_gives(remote, monkeypatch):
    """``.item()`` (and ``float()``, ``int()``, ``bool()``, branches on a value) is the most
    frequent sync: its value comes back in the reply's header, exactly, with CUDA's types."""
    values = [
        torch.tensor(0.1),
        torch.tensor(1 / 3, dtype=torch.float64),
        torch.tensor(-2.5e-3, dtype=torch.bfloat16),
        torch.tensor(65504.0, dtype=torch.float16),
        torch.tensor(2**62 + 1),
        torch.tensor(-7, dtype=torch.int8),
        torch.tensor(True),
        torch.tensor(float("nan")),
        torch.tensor(float("-inf")),
        torch.tensor([[3.25]]),  # one element, any shape
        torch.tensor(1 + 2j),  # complex: read as a tensor, as before
    ]
    for v in values:
        got, want = v.cuda().item(), v.item()
        assert type(got) is type(want) and (got == want or (got != got and want != want)), v
    x = torch.arange(6.0, device="cuda")
    assert (x[2] * 2).item() == 4.0 and int(x.sum()) == 15 and bool(x[1] > 0)
    with pytest.raises(RuntimeError, match="cannot be converted to Scalar"):
        x.item()
    sent = []
    request = remote.request
    monkeypatch.setattr(remote, "request", lambda h, b=(): sent.append(h) or request(h, b))
    assert x[5].item() == 5.0 and sent[-1]["item"] is True

    # An agent that does not know ``item`` ignores it and answers with the tensor.
    def old_agent(header, bufs=()):
        return request({k: v for k, v in header.items() if k != "item"}, bufs)

    monkeypatch.setattr(remote, "request", old_agent)
    assert x[4].item() == 4.0 and bool(x[0] == 0)


def test_an_upload_copies_the_cpu_tensor_as_it_was_when_the_op_ran(remote):
    """A copy to the GPU takes the data of that moment, as from pageable memory on CUDA: a
    buffer the program refills right after (a staging tensor, a reused batch) must not leak
    its later contents into earlier uploads, small or large."""
    for n in (4, 1 << 19):  # below and above the size that is sent at once
        staging = torch.zeros(n)
        sent = []
        for i in range(3):
            staging.fill_(i)
            sent.append(staging.to("cuda"))
            dst = torch.empty(n, device="cuda")
            dst.copy_(staging)
            sent.append(dst)
        staging.fill_(99)
        assert [float(x[0]) for x in sent] == [0, 0, 1, 1, 2, 2], n
        assert [float(x[-1]) for x in sent] == [0, 0, 1, 1, 2, 2], n


def test_printing_shows_values_and_device(remote):
    x = torch.tensor([1.5, 2.0], device="cuda")
    assert repr(x) == "tensor([1.5000, 2.0000], device='cuda:0')"
    h = torch.tensor([1, 2], dtype=torch.float16, device="cuda")
    assert "dtype=torch.float16" in repr(h) and "device='cuda:0'" in repr(h)
    w = torch.ones(2, device="cuda", requires_grad=True)
    assert "requires_grad=True" in repr(w)
    assert "grad_fn=<MulBackward0>" in repr(w * 2)
    assert "Parameter containing" in repr(nn.Linear(2, 2).cuda().weight)


def test_data_dependent_shapes_wait_for_the_agent(remote):
    x = torch.tensor([0.0, 3.0, 0.0, 5.0], device="cuda")
    assert x.nonzero().cpu().flatten().tolist() == [1, 3]
    assert x[x > 1].tolist() == [3.0, 5.0]
    assert torch.unique(torch.tensor([3, 1, 3, 2], device="cuda")).tolist() == [1, 2, 3]
    assert bool((x > 4).any()) and not bool((x > 6).any())


def test_python_lists_index_like_tensors(remote):
    local = torch.arange(20.0).view(4, 5)
    x = local.cuda()
    for index in (
        [0, 2],
        [[0, 1], [3, 3]],
        [True, False, True, False],
        ([1, 3], [0, 4]),
        (slice(None), [4, 0]),
        [],
    ):
        assert torch.equal(x[index].cpu(), local[index]), index
    x[[0, 3]] = -1.0
    local[[0, 3]] = -1.0
    assert torch.equal(x.cpu(), local)
    w = torch.ones(5, device="cuda", requires_grad=True)
    w[[1, 1, 4]].sum().backward()
    assert w.grad.tolist() == [0.0, 2.0, 0.0, 0.0, 1.0]
    t = x.new_tensor([[1, 2]], dtype=torch.int32)
    assert t.is_cuda and t.dtype == torch.int32 and t.tolist() == [[1, 2]]
    parts = torch.tensor_split(torch.arange(7, device="cuda"), torch.tensor([2, 5]))
    assert [p.tolist() for p in parts] == [[0, 1], [2, 3, 4], [5, 6]]


def test_pinned_memory_and_dataloader_pin_memory_work(remote):
    """Pinning serves a local GPU's DMA; with a remote GPU it is a plain copy, so
    DataLoader(pin_memory=True) and .pin_memory() in unchanged notebooks run."""
    t = torch.arange(4.0)
    p = t.pin_memory()
    assert torch.equal(p, t) and p.data_ptr() != t.data_ptr() and not p.is_pinned()
    assert torch.empty(3, pin_memory=True).shape == (3,)
    ds = torch.utils.data.TensorDataset(torch.arange(8.0).view(4, 2))
    sums = [
        b.cuda(non_blocking=True).sum().item()
        for (b,) in torch.utils.data.DataLoader(ds, batch_size=2, pin_memory=True)
    ]
    assert sums == [6.0, 22.0]


def test_rng_state_round_trips_so_checkpointing_replays_dropout(remote):
    state = torch.cuda.get_rng_state()
    a = torch.rand(5, device="cuda")
    torch.cuda.set_rng_state(state)
    assert torch.equal(torch.rand(5, device="cuda").cpu(), a.cpu())
    assert len(torch.cuda.random.get_rng_state_all()) == torch.cuda.device_count()
    with torch.random.fork_rng(devices=[0], device_type="cuda"):
        torch.rand(3, device="cuda")
    b = torch.rand(5, device="cuda")  # fork_rng put the state back: the draw after a
    torch.cuda.set_rng_state(state)
    torch.rand(5, device="cuda")
    assert torch.equal(torch.rand(5, device="cuda").cpu(), b.cpu())

    # Activation checkpointing re-runs the forward with the saved RNG state: same dropout mask.
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5)).cuda()
    x = torch.randn(4, 8, device="cuda", requires_grad=True)
    torch.cuda.manual_seed(1)
    torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False).sum().backward()
    g_ckpt = x.grad.cpu()
    x.grad = None
    torch.cuda.manual_seed(1)
    layer(x).sum().backward()
    assert torch.equal(x.grad.cpu(), g_ckpt)


def test_profiling_markers_and_device_contexts_are_harmless(remote):
    torch.cuda.nvtx.range_push("step")
    torch.cuda.nvtx.range_pop()
    with torch.cuda.nvtx.range("fwd"), torch.cuda.device(0):
        y = torch.ones(2, device="cuda") * 3
    assert y.sum().item() == 6.0
    with pytest.raises(RuntimeError, match="invalid device ordinal"):
        with torch.cuda.device(5):
            pass
    assert "remote GPU slice" in torch.cuda.memory_summary()


def test_save_and_load_state_dicts(remote, tmp_path):
    model = nn.Linear(3, 2).cuda()
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    on_cpu = torch.load(path, map_location="cpu")
    assert on_cpu["weight"].device.type == "cpu"
    torch.testing.assert_close(on_cpu["weight"], model.weight.detach().cpu())
    back = torch.load(path, map_location="cuda")
    assert back["weight"].is_cuda
    fresh = nn.Linear(3, 2).cuda()
    fresh.load_state_dict(back)
    torch.testing.assert_close(fresh.weight.cpu(), model.weight.cpu())
    buf = io.BytesIO()
    torch.save(torch.arange(4, device="cuda"), buf)
    buf.seek(0)
    assert torch.load(buf).is_cuda and torch.load(io.BytesIO(buf.getvalue())).tolist() == [0, 1, 2, 3]


def test_memory_accounting_follows_allocations(remote):
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    x = torch.empty(1 << 20, device="cuda")  # 4 MiB
    assert torch.cuda.memory_allocated() >= before + 4 * (1 << 20)
    del x
    torch.cuda.empty_cache()
    assert torch.cuda.memory_allocated() <= before + (1 << 16)
    assert torch.cuda.max_memory_allocated() >= before + 4 * (1 << 20)
    free, total = torch.cuda.mem_get_info()
    assert 0 < free <= total


def test_deepcopy_of_a_remote_model(remote):
    import copy

    m = nn.Linear(2, 2).cuda()
    m2 = copy.deepcopy(m)
    assert m2.weight.is_cuda and isinstance(m2.weight, nn.Parameter)
    with torch.no_grad():
        m2.weight.zero_()
    assert m.weight.abs().sum().item() > 0


def test_errors_name_the_op_and_the_session_survives(remote):
    a = torch.randn(2, 3, device="cuda")
    with pytest.raises(RuntimeError, match="size of tensor a|broadcast"):
        a + torch.randn(4, device="cuda")  # caught by shape inference, before sending
    with pytest.raises(TypeError):
        torch.randn(3, device="cuda").view("x")
    assert (a * 0).sum().item() == 0  # still usable


@pytest.mark.skipif(
    AGENT_DEVICE != "cpu", reason="on a GPU this is a sticky device-side assert: see test_slices"
)
def test_out_of_range_index_is_an_error_not_a_crash(remote):
    idx = torch.tensor([0, 7], device="cuda")
    with pytest.raises(Exception, match="index|out of"):
        torch.randn(3, device="cuda")[idx].cpu()
    assert torch.ones(2, device="cuda").sum().item() == 2


def test_async_errors_surface_at_the_next_sync_point(remote):
    # Queued without waiting (shapes are fine); the agent's failure comes back at the next
    # sync point, naming the op, with torch's own exception type.
    torch.linalg.cholesky(-torch.eye(3, device="cuda"))
    with pytest.raises(
        torch.linalg.LinAlgError, match=r"_linalg_check_errors.*asynchronously.*positive-definite"
    ):
        torch.cuda.synchronize()
    assert torch.ones(2, device="cuda").sum().item() == 2


def test_manual_seed_seeds_remote_randomness(remote):
    torch.manual_seed(5)
    a = torch.randn(4, device="cuda").cpu()
    torch.manual_seed(5)
    b = torch.randn(4, device="cuda").cpu()
    assert torch.equal(a, b)


def test_cpu_scalars_mix_with_remote_tensors(remote):
    x = torch.ones(3, device="cuda")
    assert (x * torch.tensor(2.0)).tolist() == [2.0, 2.0, 2.0]
    with pytest.raises(RuntimeError):
        x + torch.ones(3)  # a non-scalar CPU tensor: the same error as on CUDA


def test_ops_are_batched_not_sent_one_by_one(remote):
    sess = remote
    sent = []
    orig = sess._send_frames
    writes = []

    def record(frames):  # each frame is encode_frame's pieces: prefix, JSON header, payloads
        writes.append([json.loads(bytes(f[1]))["op"] for f in frames])
        return orig(frames)

    sess._send_frames = record
    try:
        x = torch.zeros(16, device="cuda")
        for _ in range(200):
            x = x + 1
        assert x[0].item() == 200
        sent = [op for w in writes for op in w]
        assert sent.count("batch") < 20 and sent[-1] == "fetch"
        # The ops still queued at the sync point travel with its request, in one write. The
        # background flush (every 2 ms) could send them first on a busy machine: hold it off
        # so the queue is surely non-empty when the sync point comes.
        sess._flush = lambda: None
        y = x * 2
        assert y[3].item() == 400
        assert writes[-1] == ["batch", "fetch"]
    finally:
        sess._send_frames = orig
        del sess._flush


def ctrl_c_drops_queued_work(n):
    """Queue tens of seconds of work, press Ctrl-C while waiting on it: the wait ends, the
    interrupted chain is gone (as the user asked) and the next op works."""
    import signal
    import threading
    import time

    x = torch.ones(n, n, device="cuda")
    for _ in range(3000):
        x = (x @ x) / n
    timer = threading.Timer(0.5, lambda: signal.raise_signal(signal.SIGINT))
    timer.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            x.sum().item()
    finally:
        timer.cancel()
    with pytest.raises(RuntimeError, match="never produced"):
        x.sum().item()
    assert torch.ones(3, device="cuda").sum().item() == 3.0
    assert time.monotonic() - t0 < 30


def test_interrupt_stops_queued_remote_work_and_the_next_call_works(remote):
    # Seconds of queued work even when the client issues slowly (a loaded machine): the agent
    # must still be busy with it when Ctrl-C comes.
    ctrl_c_drops_queued_work(512 if AGENT_DEVICE == "cpu" else 8192)


def test_a_lease_above_one_gpu_shows_several_devices(agent, own_session):
    if AGENT_DEVICE == "cuda" and not os.environ.get("ELASTIC_GPU_TEST_TWO_GPUS"):
        pytest.skip("a CUDA agent needs two GPUs for this (set ELASTIC_GPU_TEST_TWO_GPUS=1)")
    with own_session(agent.address, 2.0):
        assert torch.cuda.device_count() == 2
        x = torch.ones(3, device="cuda:1")
        assert x.device == torch.device("cuda", 1) and (x * 2).device.index == 1
        y = x.to("cuda:0")
        assert y.device.index == 0 and y.sum().item() == 3.0
        assert torch.zeros(2).cuda(1).device.index == 1


def test_an_interrupt_that_finds_the_agent_idle_does_not_touch_later_work(remote):
    x = torch.ones(4, device="cuda")
    assert x.sum().item() == 4.0
    remote.interrupt()  # e.g. Ctrl-C just as the work had finished
    y = x * 3
    assert y.sum().item() == 12.0
