"""``torch.compile`` in a remote-GPU process: graphs captured here, compiled and run on the agent.

Dynamo cannot trace over the backend's wrapper tensors, so a call is captured over *fake*
stand-ins of the same metadata on the same (egpu) device (parameters, buffers and inputs, through
``torch.func.functional_call``): Dynamo (``torch._dynamo.export``, so a graph break is an error
rather than a silent split) gives the graph, AOTAutograd lowers it to functional aten forward
and backward graphs, and each graph travels to the agent as data (``graph_to_data``: op names,
constants and references, never code). AOTAutograd's own runtime then drives the compiled
graphs with the real remote tensors: every forward or backward is one record in the batch
stream, answered by new tensor ids like any op.

Autocast is traced as on a real GPU: the capture runs under the caller's autocast state for
the backend (``torch.autocast("cuda")`` there), so remote/autocast.py's kernels, CUDA's cast
policy, insert the casts while AOTAutograd traces, and they land in the graph as ordinary
``aten._to_copy`` nodes; ``torch.autocast("cuda")`` *inside* the compiled code is an
``_enter_autocast`` node of Dynamo's graph, pointed at the backend before AOTAutograd runs it.

Captures are keyed like Dynamo's guards on what a graph depends on (input and parameter
metadata, grad mode, autocast state, training flag, constants): a new shape recompiles.
Anything that cannot be compiled this way runs eagerly, as before, after one warning naming
the reason.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import sys
import warnings

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from ..protocol.messages import CompileGraph, Free, RunGraph
from ..protocol.values import DTYPE_NAMES, MEMORY_FORMAT_NAMES
from . import backend
from .backend import BACKEND, RemoteTensor

MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
RECOMPILE_LIMIT = 8  # as torch._dynamo.config.recompile_limit: then the call runs eagerly
_FALLBACK = object()  # a capture that failed: this key runs eagerly from now on


class CompileFallback(Exception):
    """This call cannot be compiled remotely; the message says why."""


# ---------------------------------------------------------------------------------------
# torch.compile itself


def _as_plain_tangent(self, expected_meta, expected_type=None):
    # AOTAutograd traced the backward with plain (fake) tangents; at run time the gradients
    # are remote wrappers of the same metadata, which the remote graph takes as they are.
    return self


RemoteTensor.__coerce_same_metadata_as_tangent__ = _as_plain_tangent


def make_compile(original):
    """The ``torch.compile`` of a remote-GPU process (``original`` is torch's own)."""

    @functools.wraps(original)
    def compile(
        model=None,
        *,
        fullgraph=False,
        dynamic=None,
        backend="inductor",
        mode=None,
        options=None,
        disable=False,
    ):
        def wrap(m):
            if disable:
                return m
            reason = _unsupported_request(backend, mode, options)
            if reason is not None:
                warnings.warn(
                    f"torch.compile runs eagerly in this remote-GPU process: {reason}", stacklevel=3
                )
                return m
            if isinstance(m, nn.Module):
                return RemoteCompiledModule(m, mode)
            if callable(m):
                return functools.wraps(m)(RemoteCompiled(m, mode))
            raise RuntimeError(f"torch.compile expects a module or a callable, got {type(m)}")

        return wrap if model is None else wrap(model)

    return compile


def _unsupported_request(backend_, mode, options):
    if backend_ != "inductor":
        return f"only the default (inductor) backend runs on the GPU agent, not {backend_!r}"
    if mode not in MODES:
        raise RuntimeError(
            f"Unrecognized mode={mode}, should be one of: " + ", ".join(str(m) for m in MODES[1:])
        )
    if options:
        return "inductor options are not passed to the GPU agent"
    return None


class RemoteCompiled:
    """A compiled callable: per call, the capture for its guard key (made on first use)."""

    def __init__(self, fn, mode=None, module: nn.Module | None = None):
        self.fn, self.mode, self.module = fn, mode, module
        self.entries: dict = {}
        self.stats = {"captures": 0, "compiled_calls": 0, "eager_calls": 0}
        self.compiles: list[dict] = []  # the agent's answer per graph: handle, seconds, cache
        self._warned = False

    def __call__(self, *args, **kwargs):
        try:
            params = self._state()
            leaves, spec = pytree.tree_flatten((args, kwargs))
            key = _guard_key(params, leaves, spec, self.module)
        except CompileFallback as e:
            return self._eager(str(e), args, kwargs)
        entry = self.entries.get(key)
        if entry is None:
            if len(self.entries) >= RECOMPILE_LIMIT:
                return self._eager(f"more than {RECOMPILE_LIMIT} recompiles", args, kwargs)
            try:
                entry = _capture(self, params, leaves, spec)
            except CompileFallback as e:
                entry = _FALLBACK
                self._warn(str(e))
            self.entries[key] = entry
            self.stats["captures"] += 1
        if entry is _FALLBACK:
            self.stats["eager_calls"] += 1
            return self.fn(*args, **kwargs)
        self.stats["compiled_calls"] += 1
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        out = entry.run(*[t for _, t in params], *tensors)
        return pytree.tree_unflatten(list(out), entry.out_spec)

    def _state(self):
        """The module's parameters and buffers, each once, with every name it has (tied
        weights, such as a language model's head and embedding, are one tensor)."""
        if self.module is None:
            return []
        by_id: dict = {}
        for name, t in (
            *self.module.named_parameters(remove_duplicate=False),
            *self.module.named_buffers(remove_duplicate=False),
        ):
            if not isinstance(t, RemoteTensor):
                raise CompileFallback("the model's parameters are not all on the remote GPU")
            by_id.setdefault(id(t), ([], t))[0].append(name)
        return [(tuple(names), t) for names, t in by_id.values()]

    def _eager(self, reason, args, kwargs):
        self._warn(reason)
        self.stats["eager_calls"] += 1
        return self.fn(*args, **kwargs)

    def _warn(self, reason):
        if not self._warned:  # one warning per compiled model, naming the first reason
            self._warned = True
            warnings.warn(
                f"torch.compile: this call runs eagerly on the remote GPU ({reason})", stacklevel=4
            )


class RemoteCompiledModule(nn.Module):
    """What ``torch.compile(module)`` returns: like torch's ``OptimizedModule``, it holds the
    module as ``_orig_mod`` (so ``state_dict`` keys match torch's) and forwards attributes."""

    def __init__(self, mod: nn.Module, mode=None):
        super().__init__()
        self._orig_mod = mod
        self._compiled = RemoteCompiled(mod, mode, module=mod)

    def forward(self, *args, **kwargs):
        return self._compiled(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["_orig_mod"], name)


# ---------------------------------------------------------------------------------------
# Capture: Dynamo and AOTAutograd over fake stand-ins


def _tensor_key(t):
    if not isinstance(t, RemoteTensor):
        raise CompileFallback(f"a {t.device} tensor argument (only remote GPU tensors compile)")
    if t._idx:
        # The agent compiles for the session's first GPU and refuses inputs on any other.
        raise CompileFallback(f"a tensor on cuda:{t._idx} (graphs compile for cuda:0 only)")
    return (tuple(t.shape), t.stride(), t.storage_offset(), t.dtype, t.requires_grad, t._idx)


def _guard_key(params, leaves, spec, module):
    consts = []
    for x in leaves:
        if isinstance(x, torch.Tensor):
            consts.append(_tensor_key(x))
        elif type(x) in (int, float, bool, str, type(None)):
            consts.append((type(x), x))
        else:
            raise CompileFallback(f"an argument of type {type(x).__name__}")
    return (
        spec,
        tuple(consts),
        tuple((n, _tensor_key(t)) for n, t in params),
        torch.is_grad_enabled(),
        _autocast_key(),
        tuple(m.training for m in module.modules()) if module is not None else (),
    )


def _autocast_key():
    """The caller's autocast state for the backend (what ``torch.autocast("cuda")`` sets), as
    far as it changes the graph: its casts are traced into the graph, so float32 and bf16
    calls are different captures (and different graphs, hence different agent artefacts).
    Dynamo's own guards would check this too; the capture here is a one-shot export, so the
    key is where it is checked."""
    if not torch._C.is_autocast_enabled(BACKEND):
        return None
    return torch._C.get_autocast_dtype(BACKEND)


def _fake(t, mode):
    """A fake tensor of ``t``'s metadata on the backend's own device. Not a plain meta tensor:
    ops with Python meta kernels (``nll_loss``) lose their autograd formula on the meta device
    under AOTAutograd, and the loss would silently get no gradient."""
    from torch._subclasses.fake_tensor import FakeTensor

    m = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
    return FakeTensor(mode, m, torch.device(BACKEND, t._idx)).requires_grad_(t.requires_grad)


class _Entry:
    def __init__(self, run, out_spec):
        self.run, self.out_spec = run, out_spec


def _capture(owner: RemoteCompiled, params, leaves, spec):
    from . import cuda_facade

    sess = backend.current_session()
    names = [n for n, _ in params]  # tuples: the names of one tensor

    def by_name(values):
        return {n: v for ns, v in zip(names, values, strict=False) for n in ns}

    positions = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
    fn, module = owner.fn, owner.module

    def f(flat):
        state, tensors = flat[: len(names)], flat[len(names) :]
        vals = list(leaves)
        for i, t in zip(positions, tensors, strict=True):
            vals[i] = t
        args, kwargs = pytree.tree_unflatten(vals, spec)
        if module is None:
            return fn(*args, **kwargs)
        return torch.func.functional_call(module, by_name(state), args, kwargs)

    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode()
    metas = [_fake(t, fake_mode) for _, t in params] + [
        _fake(leaves[i], fake_mode) for i in positions
    ]
    graphs = _Graphs(sess, owner.mode, owner.compiles)
    # Dynamo's tracing rules and handlers are keyed by torch.cuda's own functions, which the
    # facade replaces: capture with torch's own names in place (metas need none of them).
    cuda_facade.uninstall()
    attention = _math_attention()
    cuda_autocast = _cuda_autocast_reads_backend()
    try:
        _forget_dynamo_lookups()
        try:
            # Dynamo looks at the module's own parameters too (to mark them static), and a
            # remote tensor is nothing it can trace: it sees the meta stand-ins there as well.
            with _reparametrized(module, by_name(metas)), warnings.catch_warnings():
                # Tracing without the facade, torch warns that "cuda" is absent: not news.
                warnings.simplefilter("ignore")
                exported = torch._dynamo.export(f, aten_graph=False)(metas)
        except Exception as e:
            raise CompileFallback(f"Dynamo could not capture one graph: {_first_line(e)}") from e
        gm = exported.graph_module
        _autocast_on_backend(gm)
        out_spec = gm.graph._codegen.pytree_info.out_spec
        gm.graph._codegen = torch.fx.graph.CodeGen()  # flat inputs and outputs
        gm.recompile()
        from torch._functorch.aot_autograd import aot_module_simplified

        try:
            compiled = aot_module_simplified(
                gm, metas, fw_compiler=graphs.compiler, bw_compiler=graphs.compiler
            )
            with fake_mode:
                _trigger_backward(compiled, metas)
        except CompileFallback:
            raise
        except Exception as e:
            raise CompileFallback(f"AOTAutograd could not lower the graph: {_first_line(e)}") from e
    finally:
        cuda_autocast.close()
        attention.close()
        cuda_facade.install(sess)  # registers remote/sdpa.py's kernels again
    return _Entry(compiled, out_spec)


class _math_attention:
    """While capturing, attention is PyTorch's math formulation (matmuls and a softmax that
    inductor lowers and fuses for the agent's device itself) rather than remote/sdpa.py's
    fused op: that op's kernels are the agent's own Python code, whose output layouts
    inductor would have to trust."""

    def __init__(self):
        from . import sdpa

        lib, sdpa._lib = sdpa._lib, None
        if lib is not None:
            lib._destroy()
        self.lib = torch.library.Library("aten", "IMPL")
        self.lib.impl("scaled_dot_product_attention", _math_sdpa, "AutogradPrivateUse1")

    def close(self):
        self.lib._destroy()


class _cuda_autocast_reads_backend:
    """While capturing, torch's own autocast state functions stand in torch (the facade is
    lifted): code that asks for CUDA's state (``torch.is_autocast_enabled("cuda")``, which the
    facade answers with the backend's in eager code) reads the backend's state here too, so
    the capture takes the branch eager code takes. Only CUDA tensors would see CUDA's autocast
    itself, and the capture has none."""

    def __init__(self):
        c = torch._C
        self.prev = c.is_autocast_enabled("cuda"), c.get_autocast_dtype("cuda")
        c.set_autocast_enabled("cuda", c.is_autocast_enabled(BACKEND))
        c.set_autocast_dtype("cuda", c.get_autocast_dtype(BACKEND))

    def close(self):
        torch._C.set_autocast_enabled("cuda", self.prev[0])
        torch._C.set_autocast_dtype("cuda", self.prev[1])


def _math_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    out, _ = torch.ops.aten._scaled_dot_product_attention_math(
        q, k, v, attn_mask, dropout_p, is_causal, None, scale=scale, **kw
    )
    return out


def _forget_dynamo_lookups() -> None:
    """Dynamo's tables of torch functions are keyed by the function objects and built once,
    possibly while the facade's replacements stood in torch (a library's import can do that):
    rebuild them from torch's own functions."""
    from torch._dynamo import trace_rules
    from torch._dynamo.variables import torch as torch_variables

    # Tables built at import, not cached: a facade wrapper there (functools.wraps keeps the
    # original as __wrapped__) hides torch's own function, which Dynamo would then not fold
    # (torch.is_autocast_enabled(x.device.type) became a graph break).
    for name in ("constant_fold_functions", "constant_fold_functions_need_guards"):
        table = getattr(torch_variables, name, None)
        if isinstance(table, dict):
            for fn in [f for f in table if callable(getattr(f, "__wrapped__", None))]:
                table.setdefault(fn.__wrapped__, table[fn])
    for fn in (
        getattr(trace_rules, "get_torch_obj_rule_map", None),
        getattr(trace_rules, "get_tensor_method", None),
        getattr(torch_variables, "tracing_state_functions", None),
        getattr(torch_variables, "get_overridable_functions", None),
        getattr(torch_variables.TorchInGraphFunctionVariable, "_get_handlers", None),
    ):
        if hasattr(fn, "cache_clear"):
            fn.cache_clear()


_ENTER_AUTOCAST = torch.amp.autocast_mode._enter_autocast
_EXIT_AUTOCAST = torch.amp.autocast_mode._exit_autocast


def _autocast_on_backend(gm) -> None:
    """``torch.autocast("cuda")`` inside the compiled code: Dynamo records it as
    ``_enter_autocast("cuda", dtype, enabled, cache)`` (the capture runs with torch's own
    names, so "cuda" is not mapped there). Point it at the backend, as the facade does for
    eager code, so that AOTAutograd's trace casts the stand-ins and the casts become nodes of
    the graph; anything else about autocast in the graph is not understood here."""
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is _ENTER_AUTOCAST:
            if node.args and node.args[0] == "cuda":
                node.args = (BACKEND, *node.args[1:])
            elif node.kwargs.get("device_type") == "cuda":
                node.kwargs = {**node.kwargs, "device_type": BACKEND}
        elif node.target is not _EXIT_AUTOCAST:
            name = getattr(node.target, "__name__", str(node.target))
            if "autocast" in name:
                raise CompileFallback(f"{name} in the compiled region is not captured yet")
    gm.recompile()


def _reparametrized(module, state):
    if module is None:
        return contextlib.nullcontext()
    from torch.nn.utils.stateless import _reparametrize_module

    return _reparametrize_module(module, state)


def _trigger_backward(compiled, metas):
    """AOTAutograd compiles the backward at its first use; use it now, on fakes, so that a
    backward the agent cannot compile falls back before any real step has run."""
    if not torch.is_grad_enabled():
        return
    outs = [o for o in compiled(*metas) if isinstance(o, torch.Tensor) and o.requires_grad]
    needs = [m for m in metas if m.requires_grad]
    if outs and needs:
        torch.autograd.grad(outs, needs, [torch.ones_like(o) for o in outs], allow_unused=True)


def _first_line(e) -> str:
    return (str(e).strip().split("\n")[0] or type(e).__name__)[:300]


class _Graphs:
    """AOTAutograd's fw/bw compiler: ship the graph to the agent, return its remote runner."""

    def __init__(self, sess, mode, log):
        self.sess, self.mode, self.log = sess, mode, log

    def compiler(self, gm, example_inputs):
        data, outs = graph_to_data(gm)
        try:
            reply, _ = self.sess.request(CompileGraph(graph=data, mode=self.mode).header())
        except Exception as e:
            raise CompileFallback(f"the GPU agent did not compile the graph: {e}") from e
        info = reply["graph"]
        self.log.append(info)
        report(info)
        _check_outputs(outs, info.get("outputs"))
        run = _RemoteGraph(info["handle"], gm, outs)
        run._boxed_call = True
        return run


def _check_outputs(outs, real) -> None:
    """The capture's output metadata (fake tensors, device-independent meta kernels) against
    what the agent's device computed in its first run. They can differ where a decomposition
    depends on the device (on a CPU agent, batch norm under bf16 autocast saves its statistics
    in bf16, not float32): the next graph would then get inputs it was not compiled for."""
    if real is None:  # an agent that does not say
        return
    for k, ((kind, v), r) in enumerate(zip(outs, real, strict=False)):
        if kind != "new" or r is None:
            continue
        shape, stride, _, dtype, _ = v
        claimed = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "stride": list(stride)}
        if r != claimed:
            raise CompileFallback(
                f"the GPU agent's device computes graph output {k} as {r['dtype']} "
                f"{r['shape']} (strides {r['stride']}), the capture expected "
                f"{claimed['dtype']} {claimed['shape']} (strides {claimed['stride']})"
            )


def report(info) -> None:
    """The cell's one line about a compile (stderr shows in the cell output)."""
    h, s = info["handle"][:8], info["seconds"]
    if info.get("cache") == "miss":
        print(
            f"compiled graph {h} on the GPU agent in {s:.1f} s (cached for next time)",
            file=sys.stderr,
        )
    else:
        print(f"graph {h} loaded from the GPU agent's compile cache in {s:.1f} s", file=sys.stderr)


class _RemoteGraph:
    """Runs one compiled graph: a ``RunGraph`` record in the batch stream."""

    def __init__(self, handle, gm, outs):
        self.handle, self.gm, self.outs = handle, gm, outs

    def __call__(self, args):
        if args and all(isinstance(a, FakeTensor) for a in args):
            return list(self.gm(*args))  # the capture's trial backward (_trigger_backward)
        sess = backend.current_session()
        if not all(type(a) is RemoteTensor and a._sess is sess for a in args):
            raise RuntimeError(
                "a compiled graph got an argument that is not a tensor of this remote GPU session"
            )
        idx = args[0]._idx if args else 0
        results, ids = [], []
        for kind, v in self.outs:
            if kind == "in":  # the graph returns one of its inputs
                results.append(args[v])
                ids.append(0)
            elif kind == "dup":
                results.append(results[v])
                ids.append(0)
            elif kind == "none":
                results.append(None)
            else:
                rid = sess.new_id()
                ids.append(rid)
                results.append(RemoteTensor(sess, rid, *v, idx))
        _enqueue(sess, RunGraph(self.handle, [a._rid for a in args], ids).wire())
        args.clear()  # boxed convention: the caller's list no longer keeps inputs alive
        return results


def _enqueue(sess, record) -> None:
    # As RemoteSession.enqueue, for a record that is not an op.
    if not sess.attached:
        sess.attach()
    with sess._lock:
        if sess.freed:
            freed, sess.freed = sess.freed, []
            sess._pending.append(Free(freed).wire())
        sess._pending.append(record)
        sess.stats["ops"] += 1
        sess._flush()  # one graph is a lot of work: start it now


# ---------------------------------------------------------------------------------------
# Graphs as data


def graph_to_data(gm: torch.fx.GraphModule):
    """A graph as JSON data, and how to build its outputs on the client.

    ``{"inputs": [{"dtype", "shape", "stride"}], "nodes": [{"op", "args", "kwargs"}],
    "outputs": [ref | null]}``: values are ``{"n": k}`` (input k, then node k - len(inputs)),
    JSON scalars and lists, and the wire's tags for dtypes, devices, layouts, memory formats.
    """
    index, inputs, nodes = {}, [], []
    outputs = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            val = _val(node)
            index[node] = len(inputs)
            inputs.append(
                {
                    "dtype": DTYPE_NAMES[val.dtype],
                    "shape": list(val.shape),
                    "stride": list(val.stride()),
                }
            )
        elif node.op == "call_function":
            index[node] = None  # numbered once all inputs are known
            nodes.append(node)
        elif node.op == "output":
            outputs = node.args[0]
        else:
            raise CompileFallback(f"the graph holds a {node.op} node ({node.target})")
    for k, node in enumerate(nodes):
        index[node] = len(inputs) + k
    body = [
        {
            "op": _target_name(n),
            "args": _value(list(n.args), index),
            "kwargs": {k: _value(v, index) for k, v in n.kwargs.items()},
        }
        for n in nodes
    ]
    refs, outs, first = [], [], {}
    for o in outputs:
        if o is None:
            refs.append(None)
            outs.append(("none", None))
            continue
        refs.append({"n": index[o]})
        if o.op == "placeholder":
            outs.append(("in", index[o]))
        elif o in first:
            outs.append(("dup", first[o]))
        else:
            first[o] = len(outs)
            v = _val(o)
            outs.append(
                (
                    "new",
                    (
                        tuple(v.shape),
                        v.stride(),
                        v.storage_offset(),
                        v.dtype,
                        v.untyped_storage().nbytes(),
                    ),
                )
            )
    return {"inputs": inputs, "nodes": body, "outputs": refs}, outs


def _val(node):
    v = node.meta.get("val")
    if not isinstance(v, torch.Tensor):
        raise CompileFallback(f"graph value {node.name} is not a tensor ({type(v).__name__})")
    if any(not isinstance(s, int) for s in (*v.shape, *v.stride())):
        raise CompileFallback("dynamic shapes are not compiled remotely yet")
    return v


def _target_name(node) -> str:
    t = node.target
    if t is operator.getitem:
        return "getitem"
    if isinstance(t, torch._ops.OpOverload):
        return f"{t._schema.name}.{t._overloadname}"
    raise CompileFallback(f"the graph calls {getattr(t, '__name__', t)!r}, not a torch op")


def _value(v, index):
    if isinstance(v, torch.fx.Node):
        return {"n": index[v]}
    t = type(v)
    if t in (int, float, bool, str) or v is None:
        if t is float and (v != v or v in (float("inf"), float("-inf"))):
            return {"f": str(v)}  # JSON has no nan/inf
        return v
    if isinstance(v, (list, tuple)):  # fx's immutable_list too
        return [_value(x, index) for x in v]
    if t is torch.dtype:
        return {"dt": DTYPE_NAMES[v]}
    if t is torch.device:  # the session's GPUs are the backend's devices here
        return {"dev": "cpu", "i": 0} if v.type == "cpu" else {"dev": "cuda", "i": v.index or 0}
    if t is torch.memory_format:
        return {"mf": MEMORY_FORMAT_NAMES[v]}
    if t is torch.layout and v is torch.strided:
        return {"ly": "strided"}
    raise CompileFallback(f"a graph argument of type {t.__name__}")
