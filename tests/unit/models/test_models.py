from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hpcdistill.common.errors import HpcdistillError
from hpcdistill.models.resnet import ARCHS, build_model, group_count

# Expected final-map side for a 64 px input: standard stem has total stride 32, halfres 16, lowres 8.
STRIDE = {"standard": 32, "halfres": 16, "lowres": 8}
EXPANSION = {"resnet10": 1, "resnet18": 1, "resnet34": 1, "resnet50": 4}


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("stem", ["standard", "halfres", "lowres"])
def test_output_shapes(arch: str, stem: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, 5, width=8, groups=4, stem=stem)
    feats, logits = model(torch.randn(2, 3, 64, 64))
    side = 64 // STRIDE[stem]
    assert model.feature_dim == 8 * 8 * EXPANSION[arch]
    assert feats.shape == (2, model.feature_dim, side, side)
    assert logits.shape == (2, 5)
    assert model.fc.in_features == model.feature_dim and model.fc.out_features == 5
    assert torch.isfinite(logits).all()


def test_block_counts_per_depth() -> None:
    expected = {"resnet10": 4, "resnet18": 8, "resnet34": 16, "resnet50": 16}
    for arch, n in expected.items():
        model = build_model(arch, 2, width=8)
        blocks = [b for name in ("layer1", "layer2", "layer3", "layer4") for b in getattr(model, name)]
        assert len(blocks) == n, arch


def test_resnet18_parameter_count_matches_reference() -> None:
    # torchvision's resnet18 has 11,689,512 parameters; GroupNorm's affine params equal BatchNorm's.
    model = build_model("resnet18", 1000)
    assert sum(p.numel() for p in model.parameters()) == 11_689_512


def test_groupnorm_everywhere_and_no_batchnorm() -> None:
    model = build_model("resnet50", 3, width=16)
    kinds = {type(m) for m in model.modules()}
    assert not any(issubclass(k, nn.modules.batchnorm._NormBase) for k in kinds)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(norms) == len(convs)  # every conv (incl. projection shortcuts) is followed by a GroupNorm
    for gn in norms:
        assert gn.num_channels % gn.num_groups == 0


def test_group_capping() -> None:
    assert group_count(32, 64) == 32
    assert group_count(32, 8) == 8  # capped at channel count
    assert group_count(16, 24) == 12  # largest divisor of 24 that is <= 16
    assert group_count(32, 7) == 7
    assert group_count(4, 7) == 1  # 7 is prime
    model = build_model("resnet10", 2, width=8, groups=32)
    stem_gn = model.stem[1]
    assert (stem_gn.num_groups, stem_gn.num_channels) == (8, 8)
    model = build_model("resnet10", 2, width=24, groups=16)
    assert model.stem[1].num_groups == 12
    assert {m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)} == {12, 16}


def test_init_statistics() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", 10)
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.weight.numel() > 5_000:
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
            expected = math.sqrt(2.0 / fan_out)
            std = m.weight.std().item()
            assert abs(std / expected - 1) < 0.05, (name, std, expected)
            assert abs(m.weight.mean().item()) < 0.1 * expected
        if isinstance(m, nn.GroupNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))


def test_gradient_reaches_every_parameter() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", 3, width=8, stem="lowres")
    feats, logits = model(torch.randn(2, 3, 32, 32))
    (logits.square().sum() + feats.mean()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("size", [(16, 16), (37, 53), (1, 1), (200, 96)])
def test_variable_and_tiny_sizes(size: tuple[int, int]) -> None:
    # Default width 64 / groups 32 keeps >= 2 channels per group, so even 1x1 maps normalise.
    model = build_model("resnet10", 4)
    feats, logits = model(torch.randn(1, 3, *size))
    assert logits.shape == (1, 4)
    assert feats.shape[2] == math.ceil(size[0] / 32) and feats.shape[3] == math.ceil(size[1] / 32)


def test_channels_last_matches_contiguous() -> None:
    torch.manual_seed(0)
    model = build_model("resnet10", 4, width=16, groups=8).eval()
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        f_ref, l_ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        f_cl, l_cl = model(x.to(memory_format=torch.channels_last))
    assert model.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(l_cl, l_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(f_cl, f_ref, rtol=1e-4, atol=1e-4)


def test_arch_kwargs_rebuild_same_model() -> None:
    model = build_model("resnet34", 7, width=8, groups=4, stem="lowres", in_chans=1)
    assert model.arch_kwargs == dict(arch="resnet34", num_classes=7, width=8, groups=4, stem="lowres", in_chans=1)
    clone = build_model(**model.arch_kwargs)
    clone.load_state_dict(model.state_dict())
    x = torch.randn(1, 1, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(clone(x)[1], model(x)[1])


def test_bad_arguments_give_one_line_errors() -> None:
    with pytest.raises(HpcdistillError, match=r"resnet101.*resnet10, resnet18, resnet34, resnet50") as err:
        build_model("resnet101", 3)
    assert "\n" not in str(err.value)
    with pytest.raises(HpcdistillError, match="stem.*tiny"):
        build_model("resnet18", 3, stem="tiny")
    with pytest.raises(HpcdistillError, match="width"):
        build_model("resnet18", 3, width=0)
    with pytest.raises(HpcdistillError, match="num_classes"):
        build_model("resnet18", 0)
