"""Losses against independent references: float64 numpy KL, loop max-pool, hand-built Keys bicubic, and the
documented torch resize each term uses."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from hpcdistill.common.errors import HpcdistillError
from hpcdistill.train.losses import distill_loss, pixel_loss, soft_loss


def kl_reference(s: np.ndarray, t: np.ndarray, temp: float) -> float:
    """Explicit per-sample, per-class KL(p_t || p_s) * T^2 in float64, averaged over the batch."""
    total = 0.0
    for si, ti in zip(s.astype(np.float64), t.astype(np.float64)):
        ps = np.exp(si / temp - (si / temp).max())
        ps /= ps.sum()
        pt = np.exp(ti / temp - (ti / temp).max())
        pt /= pt.sum()
        total += sum(pt[k] * math.log(pt[k] / ps[k]) for k in range(len(pt)))
    return total / len(s) * temp**2


def maxpool_reference(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Adaptive max-pool by explicit loops over bins [floor(i*H/h), ceil((i+1)*H/h))."""
    n, c, h, w = x.shape
    out = np.empty((n, c, out_h, out_w))
    for i in range(out_h):
        r0, r1 = (i * h) // out_h, -((-(i + 1) * h) // out_h)
        for j in range(out_w):
            c0, c1 = (j * w) // out_w, -((-(j + 1) * w) // out_w)
            out[:, :, i, j] = x[:, :, r0:r1, c0:c1].max(axis=(2, 3))
    return out


def keys_cubic(x: float, a: float = -0.75) -> float:
    x = abs(x)
    if x <= 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) Keys-cubic (a=-0.75) resampling matrix, half-pixel centres, edge-clamped taps."""
    m = np.zeros((n_out, n_in))
    scale = n_in / n_out
    for i in range(n_out):
        src = (i + 0.5) * scale - 0.5
        base = math.floor(src)
        for tap in range(base - 1, base + 3):
            m[i, min(max(tap, 0), n_in - 1)] += keys_cubic(src - tap)
    return m


def bicubic_reference(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    mh, mw = bicubic_matrix(x.shape[2], out_h), bicubic_matrix(x.shape[3], out_w)
    return np.einsum("ih,nchw,jw->ncij", mh, x.astype(np.float64), mw)


def pixel_reference(s: np.ndarray, t: np.ndarray, resize: tuple[str, ...]) -> float:
    refs = {"maxpool": maxpool_reference, "bicubic": bicubic_reference}
    h, w = s.shape[2:]
    return float(np.mean([np.mean((refs[name](t, h, w) - s) ** 2) for name in resize])) if resize else 0.0


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.5])
def test_soft_loss_matches_explicit_kl(temp: float) -> None:
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 5, generator=g) * 3, torch.randn(6, 5, generator=g) * 3
    got = soft_loss(s, t, temp)
    assert got.dtype == torch.float32 and got.ndim == 0
    assert got.item() == pytest.approx(kl_reference(s.numpy(), t.numpy(), temp), rel=1e-5)


def test_soft_loss_zero_for_equal_logits_and_asymmetric() -> None:
    s = torch.tensor([[1.0, 2.0, -1.0]])
    t = torch.tensor([[0.0, 3.0, 0.5]])
    assert soft_loss(s, s + 7.0, 3.0).item() == pytest.approx(0.0, abs=1e-5)  # shift-invariant softmax
    assert soft_loss(s, t, 1.0).item() > 0
    # KL(p_t || p_s) -- not the reverse direction.
    assert soft_loss(s, t, 1.0).item() == pytest.approx(kl_reference(s.numpy(), t.numpy(), 1.0), rel=1e-6)
    assert soft_loss(s, t, 1.0).item() != pytest.approx(kl_reference(t.numpy(), s.numpy(), 1.0), rel=1e-3)


def test_soft_loss_temperature_scaling_high_t_limit() -> None:
    """As T grows, KL * T^2 -> (1/2K) * sum_k (d_k - mean d)^2 with d = s - t (Hinton et al. 2015)."""
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    d = (s - t).double()
    limit = ((d - d.mean(dim=1, keepdim=True)) ** 2).sum(dim=1).mean().item() / (2 * 6)
    assert soft_loss(s, t, 100.0).item() == pytest.approx(limit, rel=1e-2)
    # Without the T^2 factor the loss would vanish like 1/T^2; with it, it stays of order one.
    assert soft_loss(s, t, 10.0).item() == pytest.approx(limit, rel=0.1)


def test_soft_loss_stable_and_bf16() -> None:
    s = torch.tensor([[1e4, -1e4, 0.0]])
    t = torch.tensor([[-1e4, 1e4, 0.0]])
    assert torch.isfinite(soft_loss(s, t, 1.0))
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(3, 4, generator=g).bfloat16(), torch.randn(3, 4, generator=g).bfloat16()
    got = soft_loss(s, t, 2.0)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(kl_reference(s.float().numpy(), t.float().numpy(), 2.0), rel=1e-5)


def test_soft_loss_bad_input() -> None:
    with pytest.raises(HpcdistillError, match="temperature"):
        soft_loss(torch.zeros(1, 2), torch.zeros(1, 2), 0.0)
    with pytest.raises(HpcdistillError, match="logits"):
        soft_loss(torch.zeros(1, 2), torch.zeros(1, 3), 1.0)


@pytest.mark.parametrize("sizes", [((7, 9), (3, 4)), ((8, 8), (4, 4)), ((5, 6), (5, 6)), ((3, 3), (5, 7))])
def test_resize_functions_match_references(sizes: tuple[tuple[int, int], tuple[int, int]]) -> None:
    (th, tw), (sh, sw) = sizes
    g = torch.Generator().manual_seed(4)
    t = torch.randn(2, 3, th, tw, generator=g)
    s = torch.randn(2, 3, sh, sw, generator=g)
    for name in ("maxpool", "bicubic"):
        got = pixel_loss(s, t, (name,)).item()
        assert got == pytest.approx(pixel_reference(s.numpy(), t.numpy(), (name,)), rel=1e-5), name


@pytest.mark.parametrize("sizes", [((12, 10), (3, 5)), ((9, 9), (4, 4)), ((4, 6), (7, 9)), ((16, 8), (5, 2))])
def test_bicubic_term_is_torch_bicubic_with_half_pixel_centres(sizes: tuple[tuple[int, int], tuple[int, int]]) -> None:
    """As documented: g = F.interpolate(mode="bicubic", align_corners=False), no antialias, then the mean squared error,
    down- and upsampling alike; not the corner-aligned or antialiased variants, and not max-pool."""
    (th, tw), (sh, sw) = sizes
    g = torch.Generator().manual_seed(10)
    t = torch.randn(2, 3, th, tw, generator=g)
    s = torch.randn(2, 3, sh, sw, generator=g)

    def mse_against(**kw) -> float:
        return torch.mean((torch.nn.functional.interpolate(t, size=(sh, sw), mode="bicubic", **kw) - s) ** 2).item()

    got = pixel_loss(s, t, ("bicubic",)).item()
    assert got == pytest.approx(mse_against(align_corners=False), rel=1e-6)
    assert got != pytest.approx(mse_against(align_corners=True), rel=1e-3)
    if sh < th and sw < tw:
        assert got != pytest.approx(mse_against(align_corners=False, antialias=True), rel=1e-3)
    assert got != pytest.approx(pixel_loss(s, t, ("maxpool",)).item(), rel=1e-3)


def test_bicubic_and_maxpool_differ_where_a_student_matches_only_one() -> None:
    """A student equal to the max-pooled teacher map costs nothing under maxpool but not under bicubic, and the
    reverse; the combined loss is then exactly half of the other term."""
    g = torch.Generator().manual_seed(11)
    t = torch.randn(1, 4, 8, 8, generator=g)
    pooled = torch.nn.functional.adaptive_max_pool2d(t, (2, 2))
    smooth = torch.nn.functional.interpolate(t, size=(2, 2), mode="bicubic", align_corners=False)
    assert pixel_loss(pooled, t, ("maxpool",)).item() == 0.0
    assert pixel_loss(pooled, t, ("bicubic",)).item() > 0.1
    assert pixel_loss(smooth, t, ("bicubic",)).item() == 0.0
    assert pixel_loss(smooth, t, ("maxpool",)).item() > 0.1
    assert pixel_loss(pooled, t).item() == pytest.approx(pixel_loss(pooled, t, ("bicubic",)).item() / 2, rel=1e-6)


@pytest.mark.parametrize("resize", [r for k in range(3) for r in itertools.permutations(("maxpool", "bicubic"), k)])
def test_every_resize_subset(resize: tuple[str, ...]) -> None:
    g = torch.Generator().manual_seed(5)
    t = torch.randn(2, 4, 10, 12, generator=g)
    s = torch.randn(2, 4, 3, 3, generator=g, requires_grad=True)
    got = pixel_loss(s, t, resize)
    assert got.dtype == torch.float32 and got.ndim == 0
    assert got.item() == pytest.approx(pixel_reference(s.detach().numpy(), t.numpy(), resize), rel=1e-5, abs=1e-12)
    got.backward()  # the empty subset still backpropagates (zero gradient)
    assert s.grad is not None and torch.isfinite(s.grad).all()
    assert (s.grad.abs().sum() > 0) == bool(resize)


def test_combined_mode_averages_both_terms() -> None:
    """Eq. 3: both terms, averaged -- unlike the authors' code, whose `elif` computes only max-pool."""
    g = torch.Generator().manual_seed(6)
    t, s = torch.randn(1, 2, 8, 8, generator=g), torch.randn(1, 2, 2, 2, generator=g)
    mp, bi = pixel_loss(s, t, ("maxpool",)), pixel_loss(s, t, ("bicubic",))
    assert mp.item() != pytest.approx(bi.item(), rel=1e-3)
    assert pixel_loss(s, t).item() == pytest.approx((mp.item() + bi.item()) / 2, rel=1e-6)


def test_zero_when_student_equals_resized_teacher() -> None:
    g = torch.Generator().manual_seed(7)
    t = torch.randn(2, 3, 9, 7, generator=g)
    s_mp = torch.from_numpy(maxpool_reference(t.numpy(), 3, 2)).float()
    s_bi = torch.from_numpy(bicubic_reference(t.numpy(), 3, 2)).float()
    assert pixel_loss(s_mp, t, ("maxpool",)).item() == pytest.approx(0.0, abs=1e-10)
    assert pixel_loss(s_bi, t, ("bicubic",)).item() == pytest.approx(0.0, abs=1e-10)
    assert pixel_loss(t, t).item() == pytest.approx(0.0, abs=1e-12)  # both g are identities at equal size
    flat = torch.full((1, 3, 8, 8), 2.5)  # a constant map resizes to itself under both g
    assert pixel_loss(torch.full((1, 3, 2, 2), 2.5), flat).item() == pytest.approx(0.0, abs=1e-10)


def test_pixel_loss_bf16_and_errors() -> None:
    g = torch.Generator().manual_seed(8)
    t, s = torch.randn(1, 2, 6, 6, generator=g).bfloat16(), torch.randn(1, 2, 3, 3, generator=g).bfloat16()
    got = pixel_loss(s, t)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(
        pixel_reference(s.float().numpy(), t.float().numpy(), ("maxpool", "bicubic")), rel=1e-5
    )
    with pytest.raises(HpcdistillError, match="channel"):
        pixel_loss(torch.zeros(1, 4, 2, 2), torch.zeros(1, 8, 4, 4))
    with pytest.raises(HpcdistillError, match="'area'.*maxpool, bicubic"):
        pixel_loss(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 4, 4), ("maxpool", "area"))
    with pytest.raises(HpcdistillError, match="twice"):
        pixel_loss(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 4, 4), ("maxpool", "maxpool"))
    assert pixel_loss(torch.zeros(1, 4, 2, 2), torch.ones(1, 4, 4, 4), "maxpool").item() == pytest.approx(1.0)


def test_distill_loss_sums_and_trains_student_only() -> None:
    g = torch.Generator().manual_seed(9)
    s_feat = torch.randn(2, 4, 2, 2, generator=g, requires_grad=True)
    s_logits = torch.randn(2, 3, generator=g, requires_grad=True)
    t_feat, t_logits = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, generator=g)
    out = distill_loss(s_feat, s_logits, t_feat, t_logits, 4.0, ("maxpool", "bicubic"))
    assert set(out) == {"total", "soft", "pixel"}
    assert out["total"].item() == pytest.approx(out["soft"].item() + out["pixel"].item(), rel=1e-6)
    # float32 cancellation in sum p (log p - log q), amplified by T^2 = 16: ~1e-6 absolute.
    assert out["soft"].item() == pytest.approx(kl_reference(s_logits.detach().numpy(), t_logits.numpy(), 4.0), rel=1e-4)
    out["total"].backward()
    assert s_feat.grad.abs().sum() > 0 and s_logits.grad.abs().sum() > 0
    kd_only = distill_loss(s_feat, s_logits, t_feat, t_logits, 4.0, ())
    assert kd_only["pixel"].item() == 0.0 and kd_only["total"].item() == pytest.approx(out["soft"].item())
