"""Path signatures (explain_callbacks.analysis.signatures) against closed forms and iisignature."""

from __future__ import annotations

import math

import pytest
import torch

from explain_callbacks.analysis.signatures import (
    augment,
    gauss_legendre,
    lead_lag,
    levy_area,
    logsignature,
    logsignature_channels,
    lyndon_words,
    signature,
    signature_channels,
    signature_levels,
    signature_words,
    word_bracket,
)


@pytest.fixture(autouse=True, params=["torch", "pysiglib"])
def backend(request):
    """Every check runs on the pure-torch implementation and on pySigLib (when installed), through the
    functions' default backend."""
    if request.param == "pysiglib":
        pytest.importorskip("pysiglib")
    funcs = (signature, logsignature)
    saved = [dict(f.__kwdefaults__) for f in funcs]
    levels_defaults = signature_levels.__defaults__
    for f in funcs:
        f.__kwdefaults__["backend"] = request.param
    signature_levels.__defaults__ = (request.param,)
    yield request.param
    for f, kw in zip(funcs, saved, strict=True):
        f.__kwdefaults__.clear()
        f.__kwdefaults__.update(kw)
    signature_levels.__defaults__ = levels_defaults


def _stream(b=4, t=12, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, d, generator=g, dtype=torch.float64).cumsum(1)


def _word_by_matrix_exp(x: torch.Tensor, word: tuple[int, ...]) -> torch.Tensor:
    """Closed form of one iterated integral of a piecewise-linear path, independent of Chen's identity in
    the tensor algebra: on a segment with increment Δ the word's integrals solve a linear ODE with the
    nilpotent generator N(Δ) (superdiagonal Δ_{i1}, …, Δ_{ik}), so the path's value is entry (0, k) of
    ∏ expm(N(Δ_s))."""
    k = len(word)
    out = []
    for path in x:
        acc = torch.eye(k + 1, dtype=x.dtype)
        for delta in path[1:] - path[:-1]:
            n = torch.zeros(k + 1, k + 1, dtype=x.dtype)
            for r, i in enumerate(word):
                n[r, r + 1] = delta[i]
            acc = acc @ torch.linalg.matrix_exp(n)
        out.append(acc[0, k])
    return torch.stack(out)


def test_piecewise_linear_closed_form():
    """Every coordinate up to level 4 equals the product of exponentials of the increments (matrix form)."""
    x = _stream(b=3, t=7, d=2)
    sig = signature(x, 4)
    words = signature_words(2, 4)
    assert sig.shape == (3, signature_channels(2, 4)) == (3, len(words))
    for col, w in enumerate(words):
        torch.testing.assert_close(sig[:, col], _word_by_matrix_exp(x, w), rtol=1e-10, atol=1e-10)


def test_level_one_and_two_closed_forms():
    x = _stream(b=5, t=30, d=3, seed=1)
    sig = signature(x, 2)
    torch.testing.assert_close(sig[:, :3], x[:, -1] - x[:, 0])  # total increment
    s2 = sig[:, 3:].view(-1, 3, 3)
    inc = x[:, -1] - x[:, 0]
    torch.testing.assert_close(s2 + s2.transpose(1, 2), inc.unsqueeze(2) * inc.unsqueeze(1))  # sym part: ½ Δ⊗Δ
    for i in range(3):
        for j in range(3):
            torch.testing.assert_close(0.5 * (s2[:, i, j] - s2[:, j, i]), levy_area(x, i, j))
    # the Lyndon coordinates of level 2 are exactly the Lévy areas
    ls = logsignature(x, 2)
    torch.testing.assert_close(ls[:, 3:], torch.stack([levy_area(x, 0, 1), levy_area(x, 0, 2), levy_area(x, 1, 2)], 1))


def test_levy_area_of_a_circle():
    """A counter-clockwise unit circle encloses area π (its Lévy area); clockwise −π."""
    th = torch.linspace(0, 2 * math.pi, 2001, dtype=torch.float64)
    circle = torch.stack([th.cos(), th.sin()], -1).unsqueeze(0)
    assert abs(float(levy_area(circle)) - math.pi) < 1e-4
    assert abs(float(logsignature(circle.flip(1), 2)[0, 2]) + math.pi) < 1e-4


def test_reparametrisation_invariance():
    """Repeated points and a time change (points inserted along the segments) leave the signature unchanged;
    time augmentation makes it see the change."""
    x = _stream(b=2, t=9, d=2, seed=2)
    repeated = x.repeat_interleave(3, dim=1)
    torch.testing.assert_close(signature(repeated, 4), signature(x, 4), rtol=1e-10, atol=1e-10)
    # non-uniform time change: split each segment at random fractions (the same piecewise-linear path)
    g = torch.Generator().manual_seed(0)
    pieces = [x[:, :1]]
    for s in range(x.shape[1] - 1):
        fr = torch.rand(3, generator=g, dtype=torch.float64).sort().values
        seg = x[:, s : s + 1] + fr.view(1, -1, 1) * (x[:, s + 1 : s + 2] - x[:, s : s + 1])
        pieces += [seg, x[:, s + 1 : s + 2]]
    refined = torch.cat(pieces, 1)
    torch.testing.assert_close(signature(refined, 4), signature(x, 4), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logsignature(refined, 3), logsignature(x, 3), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(signature(refined, 2, time=True), signature(x, 2, time=True))


def test_chen_identity_on_concatenation():
    from explain_callbacks.analysis.signatures import tensor_product

    x = _stream(b=3, t=15, d=3, seed=3)
    left, right = signature_levels(x[:, :8], 3), signature_levels(x[:, 7:], 3)
    torch.testing.assert_close(torch.cat(tensor_product(left, right), -1), signature(x, 3))


def test_augmentations():
    x = _stream(b=2, t=5, d=2, seed=4)
    ll = lead_lag(x)
    assert ll.shape == (2, 9, 4)
    torch.testing.assert_close(ll[:, -1, :2], x[:, -1])
    torch.testing.assert_close(ll[:, 0, 2:], x[:, 0])
    # the lead-lag area of a channel with itself is half its quadratic variation
    qv = ((x[:, 1:] - x[:, :-1]) ** 2).sum(1)
    torch.testing.assert_close(levy_area(ll, 0, 2) * 2, qv[:, 0])
    a = augment(x, time=True, base=True)
    assert a.shape == (2, 6, 3)
    torch.testing.assert_close(a[:, 0], torch.zeros(2, 3, dtype=x.dtype))
    torch.testing.assert_close(a[:, 1:, 2], torch.linspace(0, 1, 5, dtype=x.dtype).expand(2, 5))
    # lead-lag with given times: each time repeated as its point is (lead positions)
    times = torch.tensor([0.0, 1.0, 3.0, 4.0, 9.0], dtype=x.dtype)
    llt = augment(x, leadlag=True, time=True, times=times)
    assert llt.shape == (2, 9, 5)
    torch.testing.assert_close(llt[0, :, 4], torch.tensor([0.0, 1, 1, 3, 3, 4, 4, 9, 9], dtype=x.dtype))
    with pytest.raises(ValueError, match="times"):
        augment(x, time=True, times=torch.zeros(4))
    # basepoint: level 1 is the last point (not only the increment)
    torch.testing.assert_close(signature(x, 1, base=True), x[:, -1])


def test_lyndon_words_and_brackets():
    for d, m in [(2, 5), (3, 4), (4, 3)]:
        witt = sum(
            sum(_mobius(q) * d ** (k // q) for q in range(1, k + 1) if k % q == 0) // k for k in range(1, m + 1)
        )
        assert logsignature_channels(d, m) == len(lyndon_words(d, m)) == witt
    assert [word_bracket(w) for w in lyndon_words(2, 3)] == ["x0", "x1", "[x0,x1]", "[x0,[x0,x1]]", "[[x0,x1],x1]"]


def _mobius(n: int) -> int:
    out, p = 1, 2
    while n > 1:
        if n % p == 0:
            n //= p
            if n % p == 0:
                return 0
            out = -out
        p += 1
    return out


def test_gradients_and_errors():
    x = _stream(b=2, t=6, d=2, seed=5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: signature(z, 3, time=True, base=True), (x[:, :4],))
    assert torch.autograd.gradcheck(lambda z: logsignature(z, 3, leadlag=True), (x[:, :4],))
    with pytest.raises(ValueError, match="B, T, D"):
        signature(torch.zeros(5, 3), 2)
    with pytest.raises(ValueError, match="depth"):
        signature(torch.zeros(1, 5, 3), 0)
    with pytest.raises(ValueError, match="mode"):
        logsignature(torch.zeros(1, 5, 3), 2, mode="lyndon")
    assert signature(torch.zeros(2, 1, 3), 2).abs().sum() == 0  # one point: trivial signature
    with pytest.raises(ValueError, match="backend"):
        signature(torch.zeros(1, 5, 3), 2, backend="iisignature")


def test_gauss_legendre_exact():
    nodes, w = gauss_legendre(3)
    for k in range(6):
        assert abs(float((w * nodes**k).sum()) - 1 / (k + 1)) < 1e-12


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_against_iisignature(depth):
    iisignature = pytest.importorskip("iisignature")
    x = _stream(b=5, t=25, d=3, seed=6)
    ref = torch.from_numpy(iisignature.sig(x.numpy(), depth))
    torch.testing.assert_close(signature(x, depth), ref, rtol=0, atol=1e-6)
    prep = iisignature.prepare(3, depth, "x")
    ref_log = torch.from_numpy(iisignature.logsig(x.numpy(), prep, "x"))
    torch.testing.assert_close(logsignature(x, depth, mode="expand"), ref_log, rtol=0, atol=1e-6)
    assert logsignature(x, depth).shape[1] == iisignature.logsiglength(3, depth)
    # gradients too (iisignature's sigbackprop)
    xr = x.clone().requires_grad_(True)
    g = torch.randn(5, signature_channels(3, depth), dtype=x.dtype)
    (signature(xr, depth) * g).sum().backward()
    ref_grad = torch.from_numpy(iisignature.sigbackprop(g.numpy(), x.numpy(), depth)).double()
    # iisignature back-propagates in float32: compare on the scale of the gradient
    torch.testing.assert_close(xr.grad, ref_grad, rtol=0, atol=1e-5 * float(ref_grad.abs().max()))


def test_backends_agree():
    """pySigLib (C++, torch autograd) and the pure-torch tree product give the same signature and gradients."""
    pytest.importorskip("pysiglib")
    x = _stream(b=6, t=40, d=3, seed=7).requires_grad_(True)
    for depth in (1, 3, 5):
        a, b = signature(x, depth, backend="torch"), signature(x, depth, backend="pysiglib")
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
        (ga,) = torch.autograd.grad(a.square().sum(), x)
        (gb,) = torch.autograd.grad(b.square().sum(), x)
        torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-7)
    torch.testing.assert_close(logsignature(x, 4, backend="torch"), logsignature(x, 4, backend="pysiglib"))
    with pytest.raises(ValueError, match="pySigLib cannot"):
        signature(x.detach().half(), 2, backend="pysiglib")
    assert signature(x.detach().half(), 2, backend="auto").dtype == torch.float16  # auto falls back to torch
