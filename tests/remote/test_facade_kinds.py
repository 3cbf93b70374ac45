"""After attach, torch.cuda (and torch.cuda.amp, torch.backends.cudnn, torch.accelerator) keep
every public name of the real module with the same kind and a compatible signature, so that
libraries which annotate with, subclass, isinstance or introspect them import and run.

The names come from torch itself (snapshotted before any attach), so this holds for
whichever torch version runs it."""

from __future__ import annotations

import inspect
import sys
import types
import warnings

import pytest
import torch

from jupyter_elastic_gpu.remote import cuda_facade

_MODULES = ["torch.cuda", "torch.cuda.amp", "torch.backends.cudnn", "torch.accelerator"]


def _snapshot():
    """Each module's public names and their values, as torch made them (before install)."""
    import torch.backends.cudnn  # noqa: F401

    real = {}
    for modname in _MODULES:
        mod = sys.modules.get(modname)
        if mod is None:
            continue
        names = set(dir(mod)) | set(getattr(mod, "__all__", ()))
        real[modname] = {}
        for n in names:
            if n.startswith("_"):
                continue
            # A name installed earlier by the facade is judged against torch's original.
            orig = cuda_facade._original.get((mod, n))
            if orig is None and modname == "torch.backends.cudnn":
                orig = cuda_facade._original.get((cuda_facade._cudnn_module(), n))
            real[modname][n] = orig if orig is not None else getattr(mod, n)
    return real


REAL = _snapshot()


def _kind(v) -> str:
    if inspect.ismodule(v):
        return "module"
    if inspect.isclass(v):
        return "class"
    if callable(v):
        return "function"
    return "value"


def _accepts(new, real) -> str | None:
    """Why ``new`` cannot be called every way ``real`` can (None if it can)."""
    try:
        rs = inspect.signature(real)
    except (TypeError, ValueError):
        return None  # builtins without a signature: nothing to compare
    if new is real:
        return None
    ns = inspect.signature(new, follow_wrapped=False)
    P = inspect.Parameter
    nparams = list(ns.parameters.values())
    var_pos = any(p.kind is P.VAR_POSITIONAL for p in nparams)
    var_kw = any(p.kind is P.VAR_KEYWORD for p in nparams)
    positional = [p for p in nparams if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
    by_name = {p.name: p for p in nparams if p.kind is not P.POSITIONAL_ONLY}
    i = 0
    for rp in rs.parameters.values():
        if rp.kind is P.VAR_POSITIONAL:
            if not var_pos:
                return f"takes no *{rp.name}"
            continue
        if rp.kind is P.VAR_KEYWORD:
            if not var_kw:
                return f"takes no **{rp.name}"
            continue
        if rp.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD):
            if i >= len(positional) and not var_pos:
                return f"takes no positional argument {rp.name!r}"
            i += 1
        if rp.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY) and rp.name not in by_name:
            if not var_kw:
                return f"takes no keyword {rp.name!r}"
    # What the real one may be called without, the new one must not require.
    optional = {p.name for p in rs.parameters.values() if p.default is not P.empty}
    for k, np_ in enumerate(nparams):
        required = np_.default is P.empty and np_.kind not in (P.VAR_POSITIONAL, P.VAR_KEYWORD)
        if required and np_.name in optional:
            return f"requires {np_.name!r}, which torch's has a default for"
        if required and np_.kind is P.KEYWORD_ONLY and np_.name not in rs.parameters:
            return f"requires keyword {np_.name!r}"
        if required and k >= len(rs.parameters) and np_.kind is not P.KEYWORD_ONLY:
            return f"requires extra argument {np_.name!r}"
    return None


def _member_kind(cls, name) -> str:
    return cuda_facade._member_kind(inspect.getattr_static(cls, name))


def _all_names():
    return [(m, n) for m, names in REAL.items() for n in sorted(names)]


@pytest.mark.parametrize(("modname", "name"), _all_names(), ids=lambda v: v)
def test_name_keeps_its_kind_and_signature(remote, modname, name):
    real = REAL[modname][name]
    mod = sys.modules[modname]
    assert hasattr(mod, name), f"{modname}.{name} is gone after attach"
    new = getattr(mod, name)
    assert _kind(new) == _kind(real), f"{modname}.{name}: {_kind(real)} became {_kind(new)}"
    if _kind(real) == "function":
        why = _accepts(new, real)
        assert why is None, f"{modname}.{name}{inspect.signature(real)}: the facade's {why}"
    if _kind(real) == "class" and new is not real:
        init_why = _accepts(new.__init__, real.__init__) if "__init__" in vars(real) else None
        assert init_why is None, f"{modname}.{name}(): the facade's {init_why}"
        for member in dir(real):
            if member.startswith("_"):
                continue
            assert hasattr(new, member), f"{modname}.{name}.{member} is missing"
            want, got = _member_kind(real, member), _member_kind(new, member)
            assert got == want, f"{modname}.{name}.{member}: {want} became {got}"


def test_streams_and_events_are_classes_libraries_can_use(remote):
    ns = {"torch": torch}
    exec("class Holder:\n    s: torch.cuda.Stream | None = None\n", ns)  # transformers' pattern
    assert isinstance(torch.cuda.current_stream(), torch.cuda.Stream)
    assert torch.cuda.default_stream() == torch.cuda.current_stream()

    class MyStream(torch.cuda.Stream):
        pass

    s = MyStream()
    assert isinstance(s, torch.cuda.Stream) and issubclass(MyStream, torch.cuda.streams.Stream)
    assert s.device == torch.device("cuda", 0)
    with torch.cuda.stream(s) as entered:
        y = torch.ones(4, device="cuda") * 3
    assert entered is s and isinstance(torch.cuda.stream(s), torch.cuda.StreamContext)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    assert y.sum().item() == 12.0
    end.record(s)
    assert isinstance(start, torch.cuda.Event) and start.elapsed_time(end) >= 0
    assert isinstance(s.record_event(), torch.cuda.Event)
    with torch.cuda.device(0), torch.cuda.device_of(y):
        pass
    with pytest.raises(RuntimeError, match="invalid device ordinal 3"):
        torch.cuda.Stream(device=3)


def test_what_cannot_act_remotely_is_a_no_op_or_names_itself(remote):
    assert torch.cuda.is_current_stream_capturing() is False
    assert torch.cuda.graphs.is_current_stream_capturing() is False
    model = torch.nn.Linear(2, 2)
    assert torch.cuda.make_graphed_callables(model, (torch.ones(1, 2),)) is model
    torch.cuda.nvtx.range_push("step")
    with torch.cuda.nvtx.range("step"):
        torch.cuda.nvtx.range_pop()
    for call, feature in [
        (torch.cuda.CUDAGraph, "torch.cuda.CUDAGraph"),
        (lambda: torch.cuda.graph(None), "torch.cuda.graph"),
        (torch.cuda.utilization, "torch.cuda.utilization"),
        (lambda: torch.cuda.caching_allocator_alloc(16), "torch.cuda.caching_allocator_alloc"),
        (lambda: torch.cuda.ExternalStream(1234), "torch.cuda.ExternalStream"),
    ]:
        with pytest.raises(RuntimeError, match=f"{feature}.* not available with a remote GPU"):
            call()


def test_memory_and_rng_answer_in_every_module_libraries_use(remote):
    x = torch.ones(1024, device="cuda")
    allocated = torch.cuda.memory_allocated()
    assert allocated >= x.numel() * 4
    assert torch.cuda.memory.memory_allocated() == allocated
    stats = torch.cuda.memory_stats()
    assert stats["allocated_bytes.all.current"] == allocated
    assert torch.cuda.memory_stats_as_nested_dict()["allocated_bytes"]["all"]["current"] == allocated
    if hasattr(torch, "accelerator") and hasattr(torch.accelerator, "memory_allocated"):
        assert torch.accelerator.memory_allocated() == allocated
    free, total = torch.cuda.mem_get_info()
    assert 0 <= free <= total
    torch.cuda.random.manual_seed(5)
    a = torch.randn(3, device="cuda").tolist()
    torch.cuda.manual_seed_all(5)
    assert torch.randn(3, device="cuda").tolist() == a
    state = torch.cuda.random.get_rng_state()
    b = torch.rand(2, device="cuda").tolist()
    torch.cuda.set_rng_state(state)
    assert torch.rand(2, device="cuda").tolist() == b


def test_amp_and_device_module(remote):
    assert torch.get_device_module("cuda") is torch.cuda
    assert torch.get_device_module(torch.device("cuda")) is torch.cuda
    with torch.cuda.amp.autocast(dtype=torch.bfloat16):
        y = torch.ones(2, 2, device="cuda") @ torch.ones(2, 2, device="cuda")
    assert y.dtype == torch.bfloat16 and y.is_cuda
    scaler = torch.cuda.amp.GradScaler()
    w = torch.ones(2, device="cuda", requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1)
    scaler.scale((w * w).sum()).backward()
    scaler.step(opt)
    scaler.update()
    assert w.tolist() == pytest.approx([0.8, 0.8])


def test_autocast_state_of_cuda_is_the_remote_gpus(remote):
    # autocast("cuda") casts remote ops; code asking for CUDA's autocast state (HF's
    # maybe_autocast(x.device.type, ...), torch.utils.checkpoint, torch.amp.custom_fwd) must
    # see it on, or it skips its float32 islands and replays backward in other dtypes.
    x = torch.ones(2, 2, device="cuda")
    assert not torch.is_autocast_enabled("cuda") and not torch.is_autocast_enabled()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.is_autocast_enabled(x.device.type) and torch.is_autocast_enabled("cuda")
        assert torch.is_autocast_enabled()  # the old form without a device type means CUDA
        assert torch.is_autocast_enabled(device_type="cuda")
        assert torch.get_autocast_dtype("cuda") == torch.bfloat16
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            assert torch.get_autocast_gpu_dtype() == torch.bfloat16
        assert not torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("cuda")
    prev = torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", torch.float16)
    try:
        assert (x @ x).dtype == torch.float16  # what the setters set is what casts
    finally:
        torch.set_autocast_enabled("cuda", False)
        torch.set_autocast_dtype("cuda", prev)
    assert (x @ x).dtype == torch.float32


def test_accelerator_is_cuda(remote):
    acc = getattr(torch, "accelerator", None)
    if acc is None:
        pytest.skip("this torch has no torch.accelerator")
    assert acc.current_accelerator() == torch.device("cuda")
    assert acc.current_accelerator().type == "cuda"
    assert acc.is_available() and acc.device_count() == torch.cuda.device_count()
    assert acc.current_device_index() == 0
    acc.set_device_index(0)
    acc.synchronize()
    assert isinstance(acc.current_stream(), torch.cuda.Stream)


def test_cudnn_and_matmul_flags(remote):
    cudnn = torch.backends.cudnn
    assert cudnn.is_available() is True
    assert isinstance(cudnn.version(), int) and cudnn.version() > 0
    saved = (cudnn.enabled, cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32)
    try:
        cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32 = True, True, False
        assert (cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32) == (True, True, False)
        cudnn.enabled = False
        assert cudnn.enabled is False
    finally:
        cudnn.enabled, cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32 = saved
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = not before
        assert torch.backends.cuda.matmul.allow_tf32 is (not before)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_kind_check_can_fail():
    # The signature comparison rejects what a caller of torch's function would trip over.
    def real(device=None, *, abbreviated=False):
        pass

    assert _accepts(lambda device=None, *, abbreviated=False: 0, real) is None
    assert _accepts(lambda *a, **k: 0, real) is None
    assert "takes no keyword 'abbreviated'" in _accepts(lambda device=None: 0, real)
    assert "requires 'device'" in _accepts(lambda device, *, abbreviated=False: 0, real)
    assert _kind(types.SimpleNamespace().__init__) == "function" and _kind(torch) == "module"
