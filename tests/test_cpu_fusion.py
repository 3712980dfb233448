"""A CNN encoder's convolutions fused with batch norm, ReLU and residual add for the CPU (features/cpu_fusion.py)."""

from __future__ import annotations

import logging
import operator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from extract_helpers import write_slide
from torch import nn

from wsi_mil.features import cpu_fusion
from wsi_mil.features.cpu_fusion import CpuFusedModel, fuse_for_cpu
from wsi_mil.features.encoders import create_encoder
from wsi_mil.features.runtime import autocast_context

pytestmark = pytest.mark.usefixtures("one_torch_thread")

needs_fusion = pytest.mark.skipif(not cpu_fusion.available(torch.float32), reason="no oneDNN in this torch build")
BF16 = cpu_fusion.available(torch.bfloat16)


def _resnet() -> nn.Module:
    """timm's resnet18, random weights and batch-norm statistics far from the identity (so folding matters)."""
    torch.manual_seed(0)
    model = create_encoder("resnet18", random_init=True).model
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.3, 3.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model.to(memory_format=torch.channels_last)  # type: ignore[call-overload,no-any-return]


def _batch(n: int, seed: int = 1) -> torch.Tensor:
    x = torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    return x.contiguous(memory_format=torch.channels_last)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float()).min())


def _leftovers(fused: CpuFusedModel) -> list[str]:
    """What is left of the eager graph that fusion should have removed."""
    modules = dict(fused.graph.named_modules())
    left = []
    for node in fused.graph.graph.nodes:
        if node.op == "call_module" and type(modules[node.target]) in (nn.Conv2d, nn.BatchNorm2d, nn.ReLU):
            left.append(node.target)
        if node.op == "call_function" and node.target in (operator.add, operator.iadd):
            left.append(str(node))
    return left


@needs_fusion
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_fused_resnet_computes_the_eager_features(precision: str) -> None:
    if precision == "bf16" and not BF16:
        pytest.skip("this CPU has no native bf16")
    model = _resnet()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = _batch(4)
    with torch.inference_mode():
        before = model(x)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    fused = fuse_for_cpu(model, dtype, (3, 64, 64), batch_size=4)
    assert fused is not None
    n_conv = sum(type(m) is nn.Conv2d for m in model.modules())
    n_norm = sum(type(m) is nn.BatchNorm2d for m in model.modules())
    assert (fused.n_fused, fused.n_folded) == (n_conv, n_norm) == (20, 20)
    assert _leftovers(fused) == []  # every norm folded, every ReLU and residual add inside a convolution
    with torch.inference_mode():
        for batch in (x, _batch(3, seed=2)):  # the batch the weights were packed for, and another
            with autocast_context(torch.device("cpu"), precision):  # type: ignore[arg-type]
                eager = model(batch).float()
            got = fused(batch).float()
            assert got.shape == eager.shape
            if precision == "fp32":
                torch.testing.assert_close(got, eager, rtol=1e-3, atol=1e-3 * float(eager.abs().max()))
                assert _cosine(got, eager) > 0.99999
            else:
                assert _cosine(got, eager) > 0.9999
                assert _cosine(got, model(batch)) > 0.999
        # the model it was built from is not changed
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        assert torch.equal(model(x), before)


class _DoubledConv(nn.Conv2d):
    """A Conv2d subclass that computes something else (as timm's Conv2dSame pads first)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = -x
        return self.norm(self.conv(x)).mean((2, 3))


@needs_fusion
def test_models_that_cannot_be_fused_keep_their_eager_forward() -> None:
    no_norm = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    subclass = nn.Sequential(_DoubledConv(3, 8, 3), nn.BatchNorm2d(8), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    for model in (no_norm, subclass, _Branchy().eval(), _resnet().train()):
        assert fuse_for_cpu(model, torch.float32, (3, 32, 32), batch_size=2) is None, model


@needs_fusion
def test_a_fused_model_that_disagrees_with_the_eager_one_is_not_used(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    original = cpu_fusion.FusedConv.forward

    def off(self: Any, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        out: torch.Tensor = original(self, x, other)
        return out.flip(1) if self.add else out  # a wrong channel order in each residual branch

    monkeypatch.setattr(cpu_fusion.FusedConv, "forward", off)
    with caplog.at_level(logging.WARNING, logger="wsi_mil"):
        assert fuse_for_cpu(_resnet(), torch.float32, (3, 64, 64), batch_size=2) is None
    assert "disagrees with its eager forward" in caplog.text


@needs_fusion
def test_the_extraction_model_is_fused_only_on_the_cpu_for_cnns_that_allow_it() -> None:
    resnet = create_encoder("resnet18", random_init=True)
    assert isinstance(resnet.inference_model("fp32", 8), CpuFusedModel)
    assert resnet.inference_model("fp32", 8, cpu_fusion=False) is resnet.model
    assert resnet.inference_model("fp16", 8) is resnet.model
    # the default encoder: timm's EfficientNet blocks norm and activate in one module and fx cannot trace
    # it, so its features stay exactly as before
    lite0 = create_encoder("tf_efficientnet_lite0", random_init=True)
    assert lite0.inference_model("fp32", 8) is lite0.model
    vit = create_encoder("test_vit", random_init=True)
    assert not vit.is_cnn and vit.inference_model("fp32", 8) is vit.model


@needs_fusion
def test_extract_with_and_without_cpu_fusion_gives_the_same_bags(tmp_path: Path) -> None:
    from wsi_mil.config import ExtractConfig, load_config
    from wsi_mil.runs.extract import run_extract

    slide = write_slide(tmp_path / "slides" / "a.tif", mpp=0.5)
    base = {"encoder": "resnet18", "random_init": True, "device": "cpu", "precision": "fp32", "workers": 0,
            "batch_size": 8, "tiling": {"tile_px": 128}}  # fmt: skip
    bags = {}
    for fused in (True, False):
        out = tmp_path / f"out_{fused}"
        cfg = ExtractConfig.model_validate({**base, "cpu_fusion": fused})
        summary = run_extract([slide], out, cfg, progress=False, threads=1)
        assert summary.exit_code == 0 and summary.counts["done"] == 1, summary.text()
        assert load_config(ExtractConfig, out / "config.yaml").cpu_fusion is fused  # written next to the output
        with h5py.File(out / "features" / "a.h5") as f:
            bags[fused] = (f["features"][:], f["coords"][:])
    (on, coords_on), (off, coords_off) = bags[True], bags[False]
    assert len(coords_on) > 8 and np.array_equal(coords_on, coords_off)  # the same tiles in the same order
    assert _cosine(torch.from_numpy(on), torch.from_numpy(off)) > 0.99999
    assert not np.array_equal(on, off)  # the fused path did run
    # rounding only, like the batch size: the folder's config hash is the same, so a rerun without fusion
    # resumes a fused folder instead of refusing it
    summary = run_extract([slide], tmp_path / "out_True", ExtractConfig.model_validate({**base, "cpu_fusion": False}),
                          progress=False, threads=1)  # fmt: skip
    assert summary.exit_code == 0 and summary.counts.get("done", 0) == 0, summary.text()
