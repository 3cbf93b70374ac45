"""Checkpoints written on the remote GPU are CUDA checkpoints, and load like them."""

from __future__ import annotations

import io
import os
import pickletools
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch
import torch.nn as nn


def _storage_locations(path) -> set:
    """The location tags torch wrote for the file's storages (from its pickle, not by loading)."""
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    return {arg for op, arg, _ in pickletools.genops(data) if op.name.endswith("UNICODE")} & {
        "cpu",
        "cuda:0",
        "cuda:1",
    }


@pytest.fixture
def trained(remote):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4, device="cuda")).sum().backward()
    opt.step()
    return model, opt


def test_files_carry_cuda_location_tags(trained, tmp_path):
    model, _ = trained
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    assert _storage_locations(tmp_path / "sd.pt") == {"cuda:0"}
    torch.save({"gpu": torch.ones(2, device="cuda"), "cpu": torch.ones(2)}, tmp_path / "mix.pt")
    assert _storage_locations(tmp_path / "mix.pt") == {"cuda:0", "cpu"}


@pytest.mark.parametrize("weights_only", [True, False])
def test_a_state_dict_comes_back_on_the_gpu_without_map_location(trained, tmp_path, weights_only):
    model, _ = trained
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    loaded = torch.load(tmp_path / "sd.pt", weights_only=weights_only)
    assert list(loaded) == list(model.state_dict())
    for name, t in model.state_dict().items():
        assert loaded[name].is_cuda, name
        assert torch.equal(loaded[name].cpu(), t.cpu()), name
    fresh = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).cuda()
    fresh.load_state_dict(loaded)
    x = torch.randn(2, 4, device="cuda")
    assert torch.equal(fresh(x).cpu(), model(x).cpu())


def test_plain_tensors_keep_their_device_dtype_and_grad_flag(remote):
    buf = io.BytesIO()
    saved = {
        "gpu": torch.arange(6, device="cuda").view(2, 3).t(),  # a non-contiguous view
        "half": torch.ones(3, dtype=torch.float16, device="cuda"),
        "leaf": torch.zeros(2, device="cuda", requires_grad=True),
        "cpu": torch.arange(3),
    }
    torch.save(saved, buf)
    buf.seek(0)
    back = torch.load(buf)
    assert back["gpu"].is_cuda and back["gpu"].stride() == saved["gpu"].stride()
    assert back["gpu"].tolist() == saved["gpu"].tolist()
    assert back["half"].is_cuda and back["half"].dtype == torch.float16
    assert back["leaf"].is_cuda and back["leaf"].requires_grad
    assert back["cpu"].device.type == "cpu" and back["cpu"].tolist() == [0, 1, 2]


def test_a_whole_module_and_optimizer_state_round_trip(trained, tmp_path):
    model, opt = trained
    torch.save({"model": model, "opt": opt.state_dict()}, tmp_path / "all.pt")
    ckpt = torch.load(tmp_path / "all.pt", weights_only=False)
    m = ckpt["model"]
    assert isinstance(m[0].weight, nn.Parameter) and m[0].weight.is_cuda
    assert m[0].weight.requires_grad
    x = torch.randn(2, 4, device="cuda")
    assert torch.equal(m(x).cpu(), model(x).cpu())
    new_opt = torch.optim.AdamW(m.parameters(), lr=0.1)
    new_opt.load_state_dict(ckpt["opt"])
    state = new_opt.state[m[0].weight]
    assert state["exp_avg"].is_cuda
    assert torch.equal(state["exp_avg"].cpu(), opt.state[model[0].weight]["exp_avg"].cpu())
    m(x).sum().backward()
    new_opt.step()  # keeps training where it left off


@pytest.mark.parametrize(
    "map_location",
    ["cuda", "cuda:0", torch.device("cuda"), {"cuda:0": "cuda:0"}, lambda storage, loc: None],
    ids=["cuda", "cuda:0", "device", "dict", "callable-None"],
)
def test_map_locations_onto_the_gpu(trained, tmp_path, map_location):
    model, _ = trained
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    loaded = torch.load(tmp_path / "sd.pt", map_location=map_location)
    assert all(t.is_cuda for t in loaded.values())


@pytest.mark.parametrize(
    "map_location",
    ["cpu", torch.device("cpu"), {"cuda:0": "cpu"}, lambda storage, loc: storage],
    ids=["cpu", "device", "dict", "callable"],
)
def test_map_locations_onto_the_cpu(trained, tmp_path, map_location):
    model, _ = trained
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    loaded = torch.load(tmp_path / "sd.pt", map_location=map_location)
    for name, t in model.state_dict().items():
        assert loaded[name].device.type == "cpu" and torch.equal(loaded[name], t.cpu()), name


def test_cpu_checkpoints_load_onto_the_gpu_with_map_location(remote, tmp_path):
    torch.save({"w": torch.ones(3)}, tmp_path / "cpu.pt")
    assert torch.load(tmp_path / "cpu.pt")["w"].device.type == "cpu"
    assert torch.load(tmp_path / "cpu.pt", map_location="cuda")["w"].is_cuda


def test_a_device_the_session_does_not_have_is_a_clear_error(remote, tmp_path):
    torch.save({"w": torch.ones(3, device="cuda")}, tmp_path / "sd.pt")
    with pytest.raises(RuntimeError, match="CUDA device 1 but this session has 1 remote GPU"):
        torch.load(tmp_path / "sd.pt", map_location={"cuda:0": "cuda:1"})


def test_on_a_cpu_only_machine_the_file_is_a_cuda_checkpoint(trained, tmp_path):
    model, _ = trained
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    # A fresh interpreter that never attached: plain CPU torch, as on a laptop.
    check = textwrap.dedent(f"""
        import torch
        try:
            torch.load({str(tmp_path / "sd.pt")!r})
        except RuntimeError as e:
            print("ERROR", e)
        sd = torch.load({str(tmp_path / "sd.pt")!r}, map_location="cpu")
        print("CPU", sorted(sd), all(t.device.type == "cpu" for t in sd.values()))
        print("SUM", float(sum(t.double().sum() for t in sd.values())))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELASTIC_GPU")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # also on a GPU machine
    p = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, timeout=120, env=env
    )
    assert p.returncode == 0, p.stderr
    assert "ERROR Attempting to deserialize object on a CUDA device" in p.stdout
    assert f"CPU {sorted(model.state_dict())} True" in p.stdout
    total = float(sum(t.cpu().double().sum() for t in model.state_dict().values()))
    assert f"SUM {total}" in p.stdout
