import pytest
import torch

from twophase.params import ParamsError
from twophase.runtime import autocast, autocast_dtype, resolve_device


@pytest.fixture
def no_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_auto_prefers_cuda_then_mps_then_cpu(
    monkeypatch: pytest.MonkeyPatch, no_accelerator: None
) -> None:
    assert resolve_device("auto").type == "cpu"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto").type == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"


def test_explicit_device_overrides_and_must_exist(no_accelerator: None) -> None:
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ParamsError, match="device: 'cuda' was requested"):
        resolve_device("cuda")


def test_mixed_precision_only_where_the_device_supports_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    assert autocast_dtype(cpu, "auto") is None
    assert autocast_dtype(cpu, "fp32") is None
    assert autocast_dtype(cpu, "bf16") is torch.bfloat16
    with pytest.raises(ParamsError, match="fp16 autocast needs a CUDA device"):
        autocast_dtype(cpu, "fp16")
    assert autocast_dtype(mps, "auto") is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert autocast_dtype(cuda, "auto") is torch.bfloat16
    assert autocast_dtype(cuda, "fp16") is torch.float16
    monkeypatch.setattr(  # a T4 or V100: bf16 only emulated
        torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation
    )
    assert autocast_dtype(cuda, "auto") is torch.float16


def test_autocast_context_follows_the_device_type() -> None:
    layer = torch.nn.Linear(4, 4)
    with autocast(torch.device("cpu"), torch.bfloat16):
        assert layer(torch.ones(2, 4)).dtype is torch.bfloat16
    with autocast(torch.device("cpu"), None):
        assert layer(torch.ones(2, 4)).dtype is torch.float32
