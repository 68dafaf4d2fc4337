"""The `device` option: resolution and its one-line errors, runs on CUDA/MPS when present, and a Flower
SuperNode's own device.  Tests that need a CUDA or MPS device skip without one."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedrank import aggregation
from fedrank.cli import app
from fedrank import compute
from fedrank.compute import resolve_device, resolve_precision
from fedrank.config import ConfigError, load_config
from fedrank.job import execute

sys.path.insert(0, str(Path(__file__).parent))
from test_run import TINY, adapter, metrics, untimed  # noqa: E402

CUDA = torch.cuda.is_available()
MPS = torch.backends.mps.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device")


def one_line_error(args: list[str], tmp_path: Path) -> str:
    result = CliRunner().invoke(app, ["run", *args, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    return result.output


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "CPU", "tpu", "cuda:0,1", ""])
def test_bad_device_is_one_line_and_exit_2(name: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must be auto, cpu, cuda, cuda:N or mps"):
        resolve_device(name)
    assert "must be auto, cpu, cuda, cuda:N or mps" in one_line_error(["--set", f'device="{name}"'], tmp_path)


def test_bad_precision_and_comm_dtype_are_one_line_and_exit_2(tmp_path: Path) -> None:
    assert "`precision` must be one of fp32, bf16, fp16, auto" in one_line_error(["--set", "precision=fp8"], tmp_path)
    assert "`comm.dtype` must be one of fp32, bf16, fp16" in one_line_error(["--set", "comm.dtype=int8"], tmp_path)


def test_auto_and_cpu_resolve() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if CUDA else "cpu")


def test_this_cpus_bf16_units_match_its_cpuinfo_flags() -> None:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo on this system")
    flags = {f for line in cpuinfo.read_text().splitlines() if line.startswith("flags") for f in line.split()}
    assert compute.has_bf16_units(torch.device("cpu")) is bool(flags & {"avx512_bf16", "amx_tile"})


@pytest.mark.parametrize("units, resolved", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_is_bf16_only_where_the_device_has_bf16_units(
        units: bool, resolved: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(compute, "has_bf16_units", lambda device: units)
    assert resolve_precision("auto", torch.device("cpu")) == resolved
    assert [resolve_precision(p, torch.device("cpu")) for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    execute(load_config(None, TINY + ["precision=auto", "rounds=1"]), tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["device"], summary["precision"]) == ("cpu", resolved)
    assert f"precision {resolved};" in (tmp_path / "adapter" / "README.md").read_text()


@pytest.mark.skipif(CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_a_clear_error(name: str, tmp_path: Path) -> None:
    message = one_line_error(["--set", f"device={name}"], tmp_path)
    assert "sees no CUDA device on this machine: use device=cpu" in message


@pytest.mark.skipif(MPS, reason="this machine has MPS")
def test_mps_without_mps_is_a_clear_error(tmp_path: Path) -> None:
    assert "MPS is not available on this machine" in one_line_error(["--set", "device=mps"], tmp_path)


@needs_cuda
def test_cuda_index_out_of_range_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.parametrize("device", [
    pytest.param("cuda", marks=needs_cuda),
    pytest.param("mps", marks=pytest.mark.skipif(not MPS, reason="no MPS device")),
])
def test_a_run_on_an_accelerator_is_deterministic_and_stores_cpu_fp32(device: str, tmp_path: Path) -> None:
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        execute(load_config(None, TINY + [f"device={device}", "precision=bf16"]), out)
    assert untimed(metrics(runs[0])) == untimed(metrics(runs[1]))
    ckpt = load_file(str(sorted((runs[0] / "checkpoints").glob("round-*.safetensors"))[-1]))
    for tensors in (ckpt, adapter(runs[0])):
        assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors.values())


@needs_cuda
def test_aggregation_keeps_the_input_device_and_dtype() -> None:
    for dtype in (torch.float32, torch.float64):
        As = [torch.randn(r, 6, device="cuda", dtype=dtype) for r in (2, 4)]
        Bs = [torch.randn(5, r, device="cuda", dtype=dtype) for r in (2, 4)]
        outputs = [*aggregation.zero_pad(As, Bs, [1.0, 2.0], 4), *aggregation.replicate_pad(As, Bs, [1.0, 2.0], 4),
                   *aggregation.flora_stack(As, Bs, [1.0, 2.0]),
                   *[x for pair in aggregation.flexlora(As, Bs, [1.0, 2.0], [2, 4]) for x in pair]]
        assert all(x.device.type == "cuda" and x.dtype == dtype for x in outputs)


def test_a_supernode_picks_its_own_device_through_its_node_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedrank import experiment
    from fedrank.runtime import flower

    built: list[str] = []

    def build_node_client(cfg, clients, data=""):  # a node's client, here just the device it was built for
        built.append(cfg.device)
        return SimpleNamespace(device=cfg.device, data=SimpleNamespace(require=lambda clients: None))

    monkeypatch.setattr(experiment, "build_node_client", build_node_client)
    monkeypatch.setattr(flower, "_CLIENTS", {})
    config = flower.config_text(load_config(None, ["device=auto"]))
    content = {"task": {"config": config}}
    assert flower.node_client(content, {"device": "cpu"}).device == "cpu"
    assert flower.node_client(content, {}).device == "auto"  # the run config's device
    assert flower.node_client(content, {}).device == "auto"
    assert built == ["cpu", "auto"]  # cached
