"""Compiled graphs on the agent: a graph arrives as data, is checked, built and compiled here.

A graph (see ``remote/compile.py``) is a list of nodes, each an op name resolved through the
session's :class:`OpResolver` (allow-listed namespaces, denied ops) plus ``getitem`` on a
multi-output op's result, with arguments that are constants, tags or references to earlier
values only. So nothing a user sends becomes code: the agent writes the ``fx.Graph`` itself
and inductor compiles what the agent wrote. That is also why compiled artefacts may be shared
between sessions and users: the cache key is the graph's content, and the artefact is the
agent's own.

Caches: an LRU of compiled graphs in this process, and inductor's on-disk caches in one
directory per host, device kind and torch build (``TORCHINDUCTOR_CACHE_DIR``, size-bounded
by ``ELASTIC_GPU_COMPILE_CACHE_GIB``), which the other sessions' workers reuse.
"""

from __future__ import annotations

import collections
import hashlib
import json
import operator
import os
import time
from pathlib import Path

import torch

from ..protocol.messages import ProtocolError
from ..protocol.values import DTYPE_NAMES, DTYPES, LAYOUTS, MEMORY_FORMATS

MAX_NODES = 20_000
MAX_INPUTS = 4_096
MAX_DEPTH = 6  # nesting of argument lists
MAX_LIST = 4_096
MAX_DIMS = 12
MAX_DIM = 1 << 40
MAX_JSON = 16 << 20  # bytes of the canonical graph
LRU_SIZE = 64
CACHE_BYTES = int(float(os.environ.get("ELASTIC_GPU_COMPILE_CACHE_GIB", 4)) * (1 << 30))
MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

_compiled: collections.OrderedDict = collections.OrderedDict()  # key -> compiled callable
counters = collections.Counter()  # compiles, memory_hits, disk_hits: for tests and reports


class GraphRefused(ValueError):
    """The graph breaks a rule of the agent; the message says which."""


def configure(device_kind: str) -> None:
    """Point inductor at this host's compile cache (before inductor is imported).

    One directory per device kind and torch build, shared by the agent's workers (and by a
    restarted agent): inductor keys its entries by graph, device and versions itself."""
    base = os.environ.get("ELASTIC_GPU_COMPILE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
        "jupyter-elastic-gpu",
        "inductor",
    )
    name = _safe(f"{device_kind}-torch{torch.__version__}")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(base, name))
    if device_kind == "cpu":  # workers share the node's cores with other sessions
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:100] or "agent"


# ---------------------------------------------------------------------------------------
# Validation and rebuilding


class _Checker:
    def __init__(self, resolver, cap_bytes):
        self.resolve, self.cap = resolver, cap_bytes

    def graph(self, g) -> torch.fx.GraphModule:
        if not isinstance(g, dict) or set(g) != {"inputs", "nodes", "outputs"}:
            raise GraphRefused("a graph is an object with exactly inputs, nodes and outputs")
        ins, nodes, outs = g["inputs"], g["nodes"], g["outputs"]
        if not (isinstance(ins, list) and isinstance(nodes, list) and isinstance(outs, list)):
            raise GraphRefused("inputs, nodes and outputs must be lists")
        if len(ins) > MAX_INPUTS or len(nodes) > MAX_NODES or len(outs) > MAX_NODES:
            raise GraphRefused(f"graph too large (at most {MAX_INPUTS} inputs, {MAX_NODES} nodes)")
        graph = torch.fx.Graph()
        self.values: list = []  # fx nodes by reference number
        self.multi: dict = {}  # fx node -> number of results, for ops returning several
        total = 0
        for k, spec in enumerate(ins):
            dtype, shape, stride = self.tensor_meta(spec, k)
            total += _nbytes(shape, stride, dtype)
            if self.cap is not None and total > self.cap:
                raise GraphRefused(f"graph inputs claim more than the slice's {self.cap} bytes")
            p = graph.placeholder(f"in{k}")
            p.meta["spec"] = (dtype, shape, stride)
            self.values.append(p)
        for k, n in enumerate(nodes):
            if not isinstance(n, dict) or set(n) != {"op", "args", "kwargs"}:
                raise GraphRefused(f"node {k}: expected an object with op, args, kwargs")
            if not isinstance(n["args"], list) or not isinstance(n["kwargs"], dict):
                raise GraphRefused(f"node {k}: args must be a list and kwargs an object")
            args = tuple(self.value(a, 0) for a in n["args"])
            kwargs = {str(key): self.value(v, 0) for key, v in n["kwargs"].items()}
            if n["op"] == "getitem":
                node = self.getitem(graph, args, kwargs, k)
            else:
                op = self.op(n["op"], k)
                node = graph.call_function(op, args, kwargs)
                returns = op._schema.returns
                if len(returns) > 1:
                    self.multi[node] = len(returns)
                elif returns and str(returns[0].type).startswith(("List[", "Tensor[]")):
                    self.multi[node] = MAX_LIST
            self.values.append(node)
        graph.output(tuple(None if o is None else self.ref(o) for o in outs))
        graph.lint()
        return torch.fx.GraphModule(torch.nn.Module(), graph)

    def tensor_meta(self, spec, k):
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "stride"}:
            raise GraphRefused(f"input {k}: expected an object with dtype, shape, stride")
        dtype = DTYPES.get(spec["dtype"]) if isinstance(spec["dtype"], str) else None
        if dtype is None:
            raise GraphRefused(f"input {k}: unknown dtype {spec['dtype']!r}")
        shape, stride = spec["shape"], spec["stride"]
        for name, dims in (("shape", shape), ("stride", stride)):
            if (
                not isinstance(dims, list)
                or len(dims) > MAX_DIMS
                or not all(type(d) is int and 0 <= d <= MAX_DIM for d in dims)
            ):
                raise GraphRefused(f"input {k}: bad {name} {str(dims)[:80]}")
        if len(shape) != len(stride):
            raise GraphRefused(f"input {k}: shape and stride differ in length")
        return dtype, shape, stride

    def op(self, name, k):
        try:
            op = self.resolve(name)
        except (PermissionError, NotImplementedError) as e:
            raise GraphRefused(f"node {k}: {e}") from None
        if op._schema.is_mutable:
            # Graphs are functional (AOTAutograd's); writes would bypass the graph's contract.
            raise GraphRefused(f"node {k}: {name} writes to its arguments")
        return op

    def getitem(self, graph, args, kwargs, k):
        if kwargs or len(args) != 2 or type(args[1]) is not int:
            raise GraphRefused(f"node {k}: getitem takes (node, int)")
        src, i = args
        if not isinstance(src, torch.fx.Node) or src not in self.multi:
            raise GraphRefused(f"node {k}: getitem applies only to an op with several results")
        if not 0 <= i < self.multi[src]:
            raise GraphRefused(f"node {k}: result {i} out of range")
        return graph.call_function(operator.getitem, (src, i))

    def ref(self, v):
        n = v.get("n") if isinstance(v, dict) and len(v) == 1 else None
        if type(n) is not int or not 0 <= n < len(self.values):
            # Only earlier values exist yet: no forward references, hence no cycles.
            raise GraphRefused(f"reference {str(v)[:80]} names no earlier value")
        return self.values[n]

    def value(self, v, depth):
        t = type(v)
        if t in (int, float, bool, str) or v is None:
            if t is str and len(v) > 256:
                raise GraphRefused("string constant too long")
            return v
        if t is list:
            if depth >= MAX_DEPTH or len(v) > MAX_LIST:
                raise GraphRefused("argument lists nested too deep or too long")
            return [self.value(x, depth + 1) for x in v]
        if t is not dict or len(v) not in (1, 2):
            raise GraphRefused(f"unexpected value {str(v)[:80]}")
        if "n" in v:
            return self.ref(v)
        if "dt" in v and v["dt"] in DTYPES:
            return DTYPES[v["dt"]]
        if "dev" in v:
            return ("dev", v["dev"], v.get("i", 0))  # resolved per session at run time
        if "mf" in v and v["mf"] in MEMORY_FORMATS:
            return MEMORY_FORMATS[v["mf"]]
        if "ly" in v and v["ly"] in LAYOUTS:
            return LAYOUTS[v["ly"]]
        if "f" in v and v["f"] in ("nan", "inf", "-inf"):
            return float(v["f"])
        raise GraphRefused(f"unknown tagged value {str(v)[:80]}")


def _nbytes(shape, stride, dtype) -> int:
    if any(d == 0 for d in shape):
        return 0
    span = 1 + sum((d - 1) * s for d, s in zip(shape, stride, strict=True))
    return span * torch.empty((), dtype=dtype).element_size()


def _bind_devices(gm, devices):
    """Device constants name the session's GPUs by index: put the agent's devices in."""
    for node in gm.graph.nodes:
        node.args = _sub(node.args, devices)
        node.kwargs = _sub(node.kwargs, devices)
    gm.recompile()


def _sub(v, devices):
    if isinstance(v, tuple) and len(v) == 3 and v[0] == "dev":
        if v[1] == "cpu":
            return torch.device("cpu")
        if type(v[2]) is not int or not 0 <= v[2] < len(devices):
            raise GraphRefused(f"device index {v[2]!r} is outside this session's GPUs")
        return devices[v[2]]
    if isinstance(v, (list, tuple)):
        return type(v)(_sub(x, devices) for x in v)
    if isinstance(v, dict):
        return {k: _sub(x, devices) for k, x in v.items()}
    return v


# ---------------------------------------------------------------------------------------
# Compiling and running


class SessionGraphs:
    """The graphs one session compiled; only these handles run in it."""

    def __init__(self, executor):
        self.ex = executor
        self.graphs: dict[str, object] = {}

    def compile(self, graph, mode, device_kind) -> dict:
        if mode not in MODES:
            raise GraphRefused(f"unknown compile mode {mode!r}")
        canonical = json.dumps(graph, sort_keys=True, separators=(",", ":"))
        if len(canonical) > MAX_JSON:
            raise GraphRefused(f"graph larger than {MAX_JSON} bytes")
        dev = self.ex.devices[0]
        key = hashlib.sha256(f"{mode}|{dev.type}|{torch.__version__}|{canonical}".encode())
        key = key.hexdigest()
        t0 = time.perf_counter()
        fn = _compiled.get(key)
        if fn is not None:
            _compiled.move_to_end(key)
            counters["memory_hits"] += 1
            cache = "memory"
        else:
            gm = _Checker(self.ex.resolve, self.ex.cap_bytes or self.ex.slice_cap or None).graph(
                graph
            )
            _bind_devices(gm, self.ex.devices)
            fn, cache = _inductor(gm, mode, dev, device_kind)
            _compiled[key] = fn
            if len(_compiled) > LRU_SIZE:
                _compiled.popitem(last=False)
        self.graphs[key] = fn
        return {
            "handle": key,
            "seconds": time.perf_counter() - t0,
            "cache": cache,
            # What this device computes, so the client can check its capture's claims (a
            # decomposition may differ by device: CPU batch norm saves bf16 statistics).
            "outputs": fn.outputs,
        }

    def run(self, handle, in_ids, out_ids):
        fn = self.graphs.get(handle) if isinstance(handle, str) else None
        if fn is None:
            raise ProtocolError(f"unknown graph handle {str(handle)[:20]!r} in this session")
        if not isinstance(in_ids, list) or not isinstance(out_ids, list):
            raise ProtocolError("a graph record is ['g', handle, input ids, output ids]")
        args = [self.ex.tensor(i) for i in in_ids]
        fn.check(args)
        with torch.no_grad():
            out = fn(args)
        self.ex._store([o for o in out if o is not None], out_ids, "graph")


class _Compiled:
    """A compiled graph, the inputs it was compiled for and the outputs it gives.

    Inductor's code trusts its inputs' devices, dtypes, shapes and strides: a tensor of
    another layout would be read out of its bounds, one on another GPU with kernels built for
    this one, so every run checks them first."""

    def __init__(self, compiled, specs, outputs, device):
        self.compiled, self.specs, self.outputs, self.device = compiled, specs, outputs, device

    def check(self, args) -> None:
        if len(args) != len(self.specs):
            raise ProtocolError(
                f"the graph takes {len(self.specs)} inputs, the record names {len(args)}"
            )
        for k, (t, (dtype, shape, stride)) in enumerate(zip(args, self.specs, strict=True)):
            if t.device != self.device:
                raise ProtocolError(
                    f"graph input {k} is on {t.device}; the graph was compiled for {self.device}"
                )
            if t.dtype != dtype or list(t.shape) != shape or list(t.stride()) != stride:
                raise ProtocolError(
                    f"graph input {k} is a {str(t.dtype).removeprefix('torch.')} tensor of "
                    f"shape {list(t.shape)}, strides {list(t.stride())}; the graph was compiled "
                    f"for {str(dtype).removeprefix('torch.')} {shape}, strides {stride}"
                )

    def __call__(self, args):
        return self.compiled(*args)


def _inductor(gm, mode, dev, device_kind):
    """Compile ``gm`` with inductor for ``dev``; the first call (on example inputs built from
    the graph's own input metadata) is where inductor compiles, and checks the graph runs."""
    before = _disk_hits()
    _prune_cache_dir()
    examples, specs = [], []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            dtype, shape, stride = node.meta["spec"]
            specs.append((dtype, shape, stride))
            examples.append(
                torch.zeros(shape, dtype=dtype, device=dev).as_strided(shape, stride)
                if _nbytes(shape, stride, dtype)
                else torch.empty_strided(shape, stride, dtype=dtype, device=dev)
            )
    try:
        # Inductor straight on the agent's own graph: a second Dynamo pass over it would trace
        # into Python kernels (the agent's attention) and gains nothing on a functional graph.
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        patches = {} if mode in (None, "default") else dict(list_mode_options(mode))
        # reduce-overhead and max-autotune turn on CUDA graph trees, which start a new
        # generation only when Dynamo enters a frame (never here) and whose outputs must be
        # dead before a replay (the session's table keeps them): every call would record
        # anew. Their kernel choices and autotuning stay; the graphs do not.
        patches["triton.cudagraphs"] = False
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        # A shape environment, as Dynamo would give: without one inductor's FX graph cache
        # (what makes another session's compile of the same graph fast) stands aside.
        fake_mode = FakeTensorMode(shape_env=ShapeEnv())
        fakes = [fake_mode.from_tensor(e, static_shapes=True) for e in examples]
        with torch.no_grad():
            with torch._guards.tracing(torch._guards.TracingContext(fake_mode)):
                compiled = compile_fx(gm, fakes, config_patches=patches)
            outs = compiled(*examples)
    except GraphRefused:
        raise
    except Exception as e:
        msg = str(e).strip().split("\n")[0][:500]
        raise GraphRefused(
            f"inductor could not compile the graph: {type(e).__name__}: {msg}"
        ) from None
    hit = _disk_hits() > before
    counters["disk_hits" if hit else "compiles"] += 1
    outputs = [
        None
        if not isinstance(o, torch.Tensor)
        else {
            "dtype": DTYPE_NAMES.get(o.dtype, str(o.dtype)),
            "shape": list(o.shape),
            "stride": list(o.stride()),
        }
        for o in outs
    ]
    return _Compiled(compiled, specs, outputs, dev), "disk" if hit else "miss"


def _disk_hits() -> int:
    from torch._dynamo.utils import counters as dynamo_counters

    c = dynamo_counters["inductor"]
    return (
        c["fxgraph_cache_hit"]
        + c.get("autograd_cache_hit", 0)
        + dynamo_counters["aot_autograd"].get("autograd_cache_hit", 0)
    )


def _prune_cache_dir() -> None:
    """Keep the agent's inductor cache under ``CACHE_BYTES``: oldest files go first."""
    root = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not root or not os.path.isdir(root):
        return
    files = []
    for p in Path(root).rglob("*"):
        try:
            if p.is_file():
                st = p.stat()
                files.append((st.st_mtime, st.st_size, p))
        except OSError:
            pass
    total = sum(s for _, s, _ in files)
    for _, size, p in sorted(files):
        if total <= CACHE_BYTES:
            break
        try:
            p.unlink()
            total -= size
        except OSError:
            pass
