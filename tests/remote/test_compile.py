"""``torch.compile`` in a remote-GPU process compiles on the agent and matches eager.

A model compiled here is captured over meta stand-ins, lowered by AOTAutograd, compiled by the
agent's inductor (the CPU backend on a CPU agent, so CI runs the whole path) and run as one
batch record per forward or backward. Training a compiled copy must give the eager remote
copy's losses step for step, in float32 and under bf16 autocast; what cannot compile falls
back to eager with one warning.

CPU inductor compiles take seconds each on a small machine: the models are tiny, and every
compile the tests need is counted in the module's budget (about fifteen graphs).
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.conftest import AGENT_DEVICE

# Inductor fuses and reorders float arithmetic (and uses TF32 on a GPU), so compiled and
# eager agree to rounding, not bit for bit.
RTOL = 1e-4 if AGENT_DEVICE == "cpu" else 2e-3
ATOL = 1e-5 if AGENT_DEVICE == "cpu" else 1e-4

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def compile_agent(tmp_path_factory):
    from tests.conftest import AgentProcess

    cache = tmp_path_factory.mktemp("inductor-cache")
    a = AgentProcess(env={"ELASTIC_GPU_COMPILE_CACHE": str(cache)})
    yield a
    a.stop()


@pytest.fixture
def gpu(compile_agent, own_session):
    with own_session(compile_agent.address) as sess:
        yield sess


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.fc(x.mean((2, 3)))


class Block(nn.Module):
    """One pre-norm transformer block with causal attention over token embeddings; like HF
    models it computes its loss itself, so the loss's gradient comes from the compiled graph."""

    def __init__(self, vocab=32, d=16, heads=2):
        super().__init__()
        self.heads = heads
        self.emb = nn.Embedding(vocab, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, vocab)

    def forward(self, idx, targets):
        x = self.emb(idx)
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        x = x + self.mlp(self.ln2(x))
        logits = self.head(x)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def _token_batch():
    """Tokens for ``Block`` and their next-token targets."""
    idx = torch.randint(0, 32, (2, 8), device="cuda")
    return idx, torch.roll(idx, -1, 1)


def _train_both(model, make_batch, loss_fn, steps=3, autocast=None):
    """Train an eager and a compiled remote copy of ``model``; return both loss curves. With
    ``autocast`` (a dtype) each forward runs under ``torch.autocast("cuda", autocast)``, the
    backward and the optimizer step outside it, as the AMP recipe writes it."""
    eager = copy.deepcopy(model).to("cuda")
    base = copy.deepcopy(model).to("cuda")
    compiled = torch.compile(base)
    curves = {}
    for name, m, params in (("eager", eager, eager), ("compiled", compiled, base)):
        # SGD, not Adam: Adam's normalised steps turn rounding-level differences of near-zero
        # gradients into full-size parameter differences, hiding real ones.
        opt = torch.optim.SGD(params.parameters(), lr=0.1, momentum=0.9)
        torch.manual_seed(1)
        losses = []
        for _ in range(steps):
            x, y = make_batch()
            with (
                torch.autocast("cuda", dtype=autocast)
                if autocast is not None
                else contextlib.nullcontext()
            ):
                loss = loss_fn(m, x, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        curves[name] = losses
    return curves, eager, base, compiled


def _no_eager_warning(record):
    eager = [w for w in record if "runs eagerly" in str(w.message)]
    assert not eager, eager[0].message


def _no_autocast_warning(record):
    # e.g. "CUDA is not available ... Disabling autocast": an autocast that did nothing
    said = [w for w in record if "autocast" in str(w.message).lower()]
    assert not said, said[0].message


@pytest.fixture
def shipped(monkeypatch):
    """The graphs as they travel to the agent (``graph_to_data``'s output), in order."""
    from jupyter_elastic_gpu.remote import compile as remote_compile

    graphs = []
    real = remote_compile.graph_to_data

    def spy(gm):
        data, outs = real(gm)
        graphs.append(data)
        return data, outs

    monkeypatch.setattr(remote_compile, "graph_to_data", spy)
    return graphs


def _casts(graph, dtype):
    """The graph's ``_to_copy`` nodes to ``dtype`` (wire name, e.g. "bfloat16")."""
    return [
        n
        for n in graph["nodes"]
        if n["op"] == "aten::_to_copy.default" and n["kwargs"].get("dtype") == {"dt": dtype}
    ]


def test_compiled_cnn_training_matches_eager_step_for_step(gpu):
    torch.manual_seed(0)

    def batch():
        return torch.randn(4, 3, 8, 8, device="cuda"), torch.randint(0, 4, (4,), device="cuda")

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        curves, eager, base, compiled = _train_both(
            CNN(), batch, lambda m, x, y: F.cross_entropy(m(x), y)
        )
    _no_eager_warning(record)
    torch.testing.assert_close(curves["compiled"], curves["eager"], rtol=RTOL, atol=ATOL)
    # BatchNorm's running statistics are buffers the compiled graph updates too.
    torch.testing.assert_close(
        base.bn.running_mean.cpu(), eager.bn.running_mean.cpu(), rtol=RTOL, atol=ATOL
    )
    assert base.bn.num_batches_tracked.item() == 3
    stats = compiled._compiled.stats
    assert stats == {"captures": 1, "compiled_calls": 3, "eager_calls": 0}
    # One forward and one backward graph, each compiled by the agent.
    assert len(compiled._compiled.compiles) == 2


@pytest.mark.slow
def test_compiled_transformer_block_training_matches_eager(gpu):
    torch.manual_seed(0)

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        curves, eager, base, compiled = _train_both(Block(), _token_batch, lambda m, x, y: m(x, y))
    _no_eager_warning(record)
    torch.testing.assert_close(curves["compiled"], curves["eager"], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(
        base.head.weight.cpu(), eager.head.weight.cpu(), rtol=RTOL, atol=ATOL
    )
    assert compiled._compiled.stats["compiled_calls"] == 3
    # Eager attention (remote/sdpa.py's kernels) is back once the capture is over.
    idx, y = _token_batch()
    with torch.no_grad():
        torch.testing.assert_close(
            eager(idx, y).cpu(), compiled(idx, y).cpu(), rtol=RTOL, atol=ATOL
        )


def test_new_shape_recompiles_and_same_graph_hits_the_cache(gpu, compile_agent, own_session, capfd):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh()).to("cuda").eval()
    compiled = torch.compile(model)
    with torch.no_grad():
        for rows in (2, 3, 2):
            x = torch.randn(rows, 4, device="cuda")
            torch.testing.assert_close(compiled(x).cpu(), model(x).cpu(), rtol=RTOL, atol=ATOL)
    c = compiled._compiled
    assert c.stats["captures"] == 2  # (2, 4) and (3, 4); the second (2, 4) reuses the first
    # Two compiles; inductor's host-wide disk cache may already hold them (an earlier run).
    assert len(c.compiles) == 2 and {i["cache"] for i in c.compiles} <= {"miss", "disk"}
    told = capfd.readouterr().err  # the user is told the compile (or cache load) time
    assert "on the GPU agent in" in told or "from the GPU agent's compile cache in" in told

    # A second compiled copy in this session: the agent's in-memory cache answers.
    again = torch.compile(copy.deepcopy(model))
    with torch.no_grad():
        again(torch.randn(2, 4, device="cuda"))
    assert [i["cache"] for i in again._compiled.compiles] == ["memory"]

    # Another session (another worker process) of the agent: inductor's on-disk cache.
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    with own_session(compile_agent.address):
        other = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        other.load_state_dict(state)
        other = torch.compile(other.to("cuda").eval())
        x = torch.randn(3, 4)
        with torch.no_grad():
            y = other(x.to("cuda")).cpu()
        assert [i["cache"] for i in other._compiled.compiles] == ["disk"]
    assert "compile cache" in capfd.readouterr().err
    with torch.no_grad():
        torch.testing.assert_close(y, model(x.to("cuda")).cpu(), rtol=RTOL, atol=ATOL)


class Prints(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        print("forward of", tuple(x.shape))  # a side effect: Dynamo breaks the graph here
        return self.lin(x).relu()


class Item(Prints):
    def forward(self, x):
        scale = x.abs().max().item()  # a value only the data knows: no meta graph holds it
        return self.lin(x) / scale


@pytest.mark.parametrize(
    "cls, reason", [(Prints, "Dynamo could not capture"), (Item, "_local_scalar_dense")]
)
def test_graph_break_falls_back_to_eager_with_one_warning(gpu, cls, reason, capfd):
    torch.manual_seed(0)
    model = cls().to("cuda")
    compiled = torch.compile(model)
    x = torch.randn(3, 4, device="cuda")
    with pytest.warns(UserWarning, match=f"runs eagerly on the remote GPU .*{reason}"):
        y = compiled(x)
    torch.testing.assert_close(y.cpu(), model(x).cpu())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not per call
        compiled(x).sum().backward()
    assert model.lin.weight.grad is not None
    assert compiled._compiled.stats["eager_calls"] == 2
    assert compiled._compiled.compiles == []  # nothing reached the agent's compiler
    if cls is Prints:  # the eager fallback keeps the side effect on every call
        assert capfd.readouterr().out.count("forward of (3, 4)") >= 3


def test_decorator_form_and_modes_are_accepted(gpu):
    @torch.compile(mode="reduce-overhead")
    def f(x, y):
        return x * y + 1

    x = torch.randn(3, device="cuda")
    assert f.__name__ == "f"
    torch.testing.assert_close(f(x, x).cpu(), (x * x + 1).cpu())
    assert f.stats["compiled_calls"] == 1
    with pytest.warns(UserWarning, match="only the default"):
        g = torch.compile(lambda x: x, backend="eager")
    assert g(x) is x
    with pytest.raises(RuntimeError, match="Unrecognized mode"):
        torch.compile(lambda x: x, mode="fastest")
    assert torch.compile(f, disable=True) is f


def test_a_model_on_the_second_gpu_of_a_slice_runs_eagerly(compile_agent, own_session):
    # The agent compiles for the session's first GPU and refuses a graph's inputs on another.
    if AGENT_DEVICE == "cuda" and not os.environ.get("ELASTIC_GPU_TEST_TWO_GPUS"):
        pytest.skip("a CUDA agent needs two GPUs for this (set ELASTIC_GPU_TEST_TWO_GPUS=1)")
    with own_session(compile_agent.address, 2.0):
        model = nn.Linear(3, 2).to("cuda:1")
        compiled = torch.compile(model)
        x = torch.randn(2, 3, device="cuda:1")
        with pytest.warns(UserWarning, match="graphs compile for cuda:0 only"):
            out = compiled(x)
        assert out.device == torch.device("cuda", 1)
        torch.testing.assert_close(out.cpu(), model(x).cpu())
        assert compiled._compiled.stats["compiled_calls"] == 0


def test_cpu_tensors_run_eagerly(gpu):
    model = nn.Linear(3, 2)  # never moved to the GPU
    compiled = torch.compile(model)
    x = torch.randn(2, 3)
    with pytest.warns(UserWarning, match="not all on the remote GPU"):
        torch.testing.assert_close(compiled(x), model(x))


# ---------------------------------------------------------------------------------------
# Autocast: the casts of CUDA's policy are traced into the graph (as on a real GPU), so the
# compiled graph computes in the dtypes eager autocast does.

# bf16 has 8 bits of mantissa; inductor also keeps some bf16 intermediates in float32.
BF16_RTOL, BF16_ATOL = 2e-2, 1e-2


def test_compiled_training_under_bf16_autocast_matches_eager_step_for_step(gpu, shipped):
    torch.manual_seed(0)

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        curves, eager, base, compiled = _train_both(
            Block(), _token_batch, lambda m, x, y: m(x, y), autocast=torch.bfloat16
        )
    _no_eager_warning(record)
    _no_autocast_warning(record)
    assert compiled._compiled.stats == {"captures": 1, "compiled_calls": 3, "eager_calls": 0}
    torch.testing.assert_close(curves["compiled"], curves["eager"], rtol=BF16_RTOL, atol=BF16_ATOL)
    # Parameters stay float32 (autocast casts copies), updated alike by SGD between calls.
    assert base.head.weight.dtype == torch.float32
    torch.testing.assert_close(
        base.head.weight.cpu(), eager.head.weight.cpu(), rtol=BF16_RTOL, atol=BF16_ATOL
    )
    # The forward graph casts the weights and activations of every linear to bf16 (CUDA's
    # lower-precision list) and the logits back to float32 for the loss (its float32 list):
    # explicit ops of the graph, so the agent needs no autocast of its own.
    forward, backward = shipped
    assert len(_casts(forward, "bfloat16")) >= 5  # qkv, proj, mlp x2, head: weight casts
    assert _casts(forward, "float32")
    assert any(i["dtype"] == "bfloat16" for i in backward["inputs"])  # saved bf16 activations


def test_autocast_on_off_and_dtype_change_recompile_and_reuse(gpu, shipped):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to("cuda").eval()
    compiled = torch.compile(model)
    x = torch.randn(2, 4, device="cuda")
    states = [torch.bfloat16, None, torch.bfloat16, torch.float16, None]
    with warnings.catch_warnings(record=True) as record, torch.no_grad():
        warnings.simplefilter("always")
        for dtype in states:
            with torch.autocast("cuda", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                y, want = compiled(x), model(x)
            assert y.dtype == want.dtype == (dtype or torch.float32)
            rtol, atol = (RTOL, ATOL) if dtype is None else (BF16_RTOL, BF16_ATOL)
            torch.testing.assert_close(y.cpu(), want.cpu(), rtol=rtol, atol=atol)
    _no_eager_warning(record)
    c = compiled._compiled
    # bf16, float32 and fp16 are three graphs; the repeated states reuse theirs.
    assert c.stats == {"captures": 3, "compiled_calls": 5, "eager_calls": 0}
    assert len({i["handle"] for i in c.compiles}) == 3  # three agent artefacts, never shared
    bf16, f32, f16 = shipped
    assert _casts(bf16, "bfloat16") and _casts(f16, "float16")
    assert not _casts(f32, "bfloat16") and not _casts(f32, "float16")


class AutocastInside(nn.Module):
    """Autocast written in ``forward``, as some models do: a bf16 region with a float32
    island whose device comes from the tensor (HF's spelling)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            h = self.a(x).tanh()
            with torch.autocast(device_type=x.device.type, enabled=False):
                h = h.float().softmax(-1) * 2
            return self.b(h)


def test_autocast_inside_the_compiled_forward_is_captured(gpu, shipped):
    torch.manual_seed(0)
    model = AutocastInside().to("cuda")
    eager = copy.deepcopy(model)
    compiled = torch.compile(model)
    x = torch.randn(3, 4, device="cuda")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        y, want = compiled(x), eager(x)
        y.float().square().sum().backward()
        want.float().square().sum().backward()
    _no_eager_warning(record)
    _no_autocast_warning(record)
    assert y.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(y.cpu(), want.cpu(), rtol=BF16_RTOL, atol=BF16_ATOL)
    for p, q in ((model.a.weight, eager.a.weight), (model.b.bias, eager.b.bias)):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad.cpu(), q.grad.cpu(), rtol=BF16_RTOL, atol=BF16_ATOL)
    assert compiled._compiled.stats["compiled_calls"] == 1
    forward = shipped[0]
    assert _casts(forward, "bfloat16") and _casts(forward, "float32")


class ReadsAutocastState(nn.Module):
    """Code that asks whether autocast is on before leaving it, as HF's ``maybe_autocast``
    does around Llama's rotary embedding: the answer must be the same while capturing as in
    eager code, or the compiled graph would take the other branch."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)

    def forward(self, x):
        h = self.a(x)
        dev = x.device.type
        on = torch.is_autocast_enabled(dev)
        with torch.autocast(dev, enabled=False) if on else contextlib.nullcontext():
            f = h.float() @ h.float().T  # a float32 island under autocast
        if torch.is_autocast_enabled("cuda"):  # spelled as CUDA: the facade answers eagerly
            f = f * 2
        return f


def test_code_reading_the_autocast_state_takes_the_same_branch_compiled(gpu, shipped):
    torch.manual_seed(0)
    model = ReadsAutocastState().to("cuda").eval()
    compiled = torch.compile(model)
    x = torch.randn(3, 4, device="cuda")
    with warnings.catch_warnings(record=True) as record, torch.no_grad():
        warnings.simplefilter("always")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, want = compiled(x), model(x)
    _no_eager_warning(record)
    assert y.dtype == want.dtype == torch.float32  # the island stayed float32 in both
    torch.testing.assert_close(y.cpu(), want.cpu(), rtol=BF16_RTOL, atol=BF16_ATOL)
    # The island's matmul ran on float32 copies of the bf16 linear output, doubled.
    h = model.a(x).to(torch.bfloat16).float()
    torch.testing.assert_close(want.cpu(), (h @ h.T * 2).cpu(), rtol=BF16_RTOL, atol=BF16_ATOL)
    assert not _casts(shipped[0], "float16")


def test_outputs_the_agents_device_computes_otherwise_fall_back_not_garbage(gpu):
    """Batch norm under bf16 autocast saves its statistics in float32 on a GPU (and in the
    capture), but in bf16 on a CPU agent (its decomposition casts them to the input's dtype):
    the backward graph, compiled for float32 statistics, would read them out of bounds. The
    client compares the agent's outputs with its capture and falls back instead."""
    torch.manual_seed(0)
    model = CNN().to("cuda")
    eager = copy.deepcopy(model)
    compiled = torch.compile(model)
    x = torch.randn(2, 3, 8, 8, device="cuda")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, want = compiled(x), eager(x)
        y.float().sum().backward()
        want.float().sum().backward()
    fallback = [w for w in record if "runs eagerly" in str(w.message)]
    if AGENT_DEVICE == "cpu":
        assert len(fallback) == 1
        assert "computes graph output" in str(fallback[0].message)
        assert "as bfloat16 [8]" in str(fallback[0].message)
        assert compiled._compiled.stats["eager_calls"] == 1
    else:
        assert not fallback
    torch.testing.assert_close(y.cpu(), want.cpu(), rtol=BF16_RTOL, atol=BF16_ATOL)
    torch.testing.assert_close(
        model.conv.weight.grad.cpu(), eager.conv.weight.grad.cpu(), rtol=BF16_RTOL, atol=BF16_ATOL
    )
