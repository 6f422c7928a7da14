"""orthogonal_loss / add_orthogonal_grad_ against a float64 reference written from the math.

Reference: for each module, restrict to its active index set A and take
‖P[:, A]ᵀP[:, A] − I‖²_F + ‖Q[A]Q[A]ᵀ − I‖²_F, times γ; gradients by float64 autograd of that.
"""

from types import SimpleNamespace

import pytest
import torch

from flexlora.alloc import _batch
from flexlora.alloc.orthogonal import add_orthogonal_grad_, orthogonal_loss
from flexlora.layers.flex_linear import FlexLinear

GAMMA = 0.37


def make_modules(adapter_dtype=torch.float32, seed=0):
    """Mixed shapes (two groups of equal shape, singletons), masks all-on / all-off / random /
    a single slot; P, Q far from orthonormal so every term matters."""
    torch.manual_seed(seed)
    specs = [(12, 10, 8), (12, 10, 8), (12, 10, 8), (5, 9, 8), (5, 9, 8), (7, 3, 4), (6, 6, 1)]
    mods = []
    for k, (i, o, R) in enumerate(specs):
        m = FlexLinear(i, o, R, min(R, 3), 4.0, adapter_dtype=adapter_dtype)
        with torch.no_grad():
            m.P.normal_(0, 0.5)
            m.Q.normal_(0, 0.5)
            m.lam.normal_()
        kind = k % 4
        if kind == 0:
            m.mask.fill_(True)
        elif kind == 1:
            m.mask.copy_(torch.rand(R) < 0.5)
        elif kind == 2:
            m.mask.fill_(False)
        else:
            m.mask.fill_(False)
            m.mask[R - 1] = True
        mods.append(m)
    return mods


def reference(mods, gamma):
    """(loss, [(dP, dQ)]) in float64: γ times the mean over modules of the masked penalties."""
    total = torch.zeros((), dtype=torch.float64)
    leaves = []
    for m in mods:
        P = m.P.detach().double().requires_grad_(True)
        Q = m.Q.detach().double().requires_grad_(True)
        A = m.mask.nonzero().flatten()
        Pa, Qa = P[:, A], Q[A]
        eye = torch.eye(len(A), dtype=torch.float64)
        total = total + ((Pa.t() @ Pa - eye) ** 2).sum() + ((Qa @ Qa.t() - eye) ** 2).sum()
        leaves.append((P, Q))
    total = total * gamma / len(mods)
    total.backward()
    return total.detach(), [(P.grad, Q.grad) for P, Q in leaves]


def assert_close(got, ref, what, rtol):
    err = (got.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rtol * max(scale, 1e-30) + 1e-12, f"{what}: max abs err {err:.3g} vs scale {scale:.3g}"


def assert_inactive_zero(mods, grads):
    for k, (m, (gP, gQ)) in enumerate(zip(mods, grads)):
        off = ~m.mask
        assert (gP[:, off] == 0.0).all(), f"module {k}: inactive P columns got gradient"
        assert (gQ[off] == 0.0).all(), f"module {k}: inactive Q rows got gradient"


DTYPES = {"fp32": (torch.float32, 2e-6), "bf16": (torch.bfloat16, 1e-2)}


@pytest.mark.parametrize("dt", list(DTYPES))
def test_loss_and_autograd_match_reference(dt):
    dtype, rtol = DTYPES[dt]
    mods = make_modules(dtype)
    ref_loss, ref_grads = reference(mods, GAMMA)
    loss = orthogonal_loss(mods, GAMMA)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    # the Gram is computed in fp32 from the stored (possibly bf16) values, like the reference
    assert_close(loss, ref_loss, "loss", 2e-6)
    loss.backward()
    got = [(m.P.grad, m.Q.grad) for m in mods]
    for k, ((gP, gQ), (rP, rQ)) in enumerate(zip(got, ref_grads)):
        assert_close(gP, rP, f"module {k} dP", rtol)
        assert_close(gQ, rQ, f"module {k} dQ", rtol)
    assert_inactive_zero(mods, got)


@pytest.mark.parametrize("dt", list(DTYPES))
def test_in_place_grad_matches_reference_and_autograd(dt):
    dtype, rtol = DTYPES[dt]
    mods = make_modules(dtype)
    _, ref_grads = reference(mods, GAMMA)
    orthogonal_loss(mods, GAMMA).backward()
    auto = [(m.P.grad.clone(), m.Q.grad.clone()) for m in mods]
    for m in mods:
        m.P.grad = None
        m.Q.grad = None
    add_orthogonal_grad_(mods, GAMMA)  # grads are None: created
    got = [(m.P.grad, m.Q.grad) for m in mods]
    for k, ((gP, gQ), (rP, rQ), (aP, aQ)) in enumerate(zip(got, ref_grads, auto)):
        assert gP.dtype == dtype and gQ.dtype == dtype
        assert_close(gP, rP, f"module {k} dP", rtol)
        assert_close(gQ, rQ, f"module {k} dQ", rtol)
        assert_close(gP, aP.double(), f"module {k} dP vs autograd", rtol)
        assert_close(gQ, aQ.double(), f"module {k} dQ vs autograd", rtol)
    assert_inactive_zero(mods, got)


def test_in_place_grad_accumulates_into_existing_grad():
    mods = make_modules()
    _, ref_grads = reference(mods, GAMMA)
    base = []
    for m in mods:
        m.P.grad = torch.randn_like(m.P)
        m.Q.grad = torch.randn_like(m.Q)
        base.append((m.P.grad.clone(), m.Q.grad.clone(), m.P.grad.data_ptr()))
    add_orthogonal_grad_(mods, GAMMA)
    for k, (m, (bP, bQ, ptr), (rP, rQ)) in enumerate(zip(mods, base, ref_grads)):
        assert m.P.grad.data_ptr() == ptr, "grad must be updated in place"
        assert_close(m.P.grad - bP, rP, f"module {k} dP", 2e-6)
        assert_close(m.Q.grad - bQ, rQ, f"module {k} dQ", 2e-6)
        off = ~m.mask
        assert torch.equal(m.P.grad[:, off], bP[:, off]) and torch.equal(m.Q.grad[off], bQ[off])


def test_chunked_groups_give_the_same_result(monkeypatch):
    mods = make_modules()
    whole = orthogonal_loss(mods, GAMMA)
    add_orthogonal_grad_(mods, GAMMA)
    g_whole = [(m.P.grad.clone(), m.Q.grad.clone()) for m in mods]
    for m in mods:
        m.P.grad = m.Q.grad = None
    monkeypatch.setattr(_batch, "MAX_CHUNK_ELEMS", 1)  # one module per chunk
    assert torch.allclose(orthogonal_loss(mods, GAMMA), whole, rtol=1e-6)
    add_orthogonal_grad_(mods, GAMMA)
    for (a, b), m in zip(g_whole, mods):
        assert torch.allclose(m.P.grad, a, rtol=1e-6, atol=1e-7) and torch.allclose(m.Q.grad, b, rtol=1e-6, atol=1e-7)


def test_orthonormal_active_slots_cost_nothing():
    torch.manual_seed(1)
    m = FlexLinear(16, 12, 8, 8, 4.0)
    with torch.no_grad():
        m.P.copy_(torch.linalg.qr(torch.randn(12, 8))[0])
        m.Q.copy_(torch.linalg.qr(torch.randn(16, 8))[0].t())
        m.P[:, 5:] *= 3.0  # inactive slots may be anything
        m.Q[5:] *= 3.0
        m.mask[5:] = False
    assert orthogonal_loss([m], 1.0).item() < 1e-10


def test_gamma_zero_and_empty():
    mods = make_modules()
    assert orthogonal_loss(mods, 0.0).item() == 0.0
    add_orthogonal_grad_(mods, 0.0)
    assert all(m.P.grad is None and m.Q.grad is None for m in mods)
    assert orthogonal_loss([], GAMMA).item() == 0.0
    add_orthogonal_grad_([], GAMMA)


def test_frozen_parameters_are_left_alone():
    mods = make_modules()
    mods[0].P.requires_grad_(False)
    add_orthogonal_grad_(mods, GAMMA)
    assert mods[0].P.grad is None and mods[0].Q.grad is not None


@pytest.mark.parametrize("gamma", [-0.1, "0.1", None, True], ids=["negative", "string", "none", "bool"])
def test_bad_gamma(gamma):
    mods = make_modules()
    with pytest.raises(ValueError, match="gamma must be a number >= 0"):
        orthogonal_loss(mods, gamma)
    with pytest.raises(ValueError, match="gamma must be a number >= 0"):
        add_orthogonal_grad_(mods, gamma)


def test_gradcheck_float64():
    torch.manual_seed(2)
    shapes = [(4, 3, 5), (4, 3, 5), (6, 3, 3)]  # (out, R, in)
    masks = [torch.tensor([True, True, False]), torch.tensor([False, True, True]), torch.ones(3, dtype=torch.bool)]

    def f(*xs):
        mods = [SimpleNamespace(P=P, Q=Q, mask=m) for P, Q, m in zip(xs[0::2], xs[1::2], masks)]
        return orthogonal_loss(mods, GAMMA)

    inputs = []
    for o, R, i in shapes:
        inputs += [torch.randn(o, R, dtype=torch.float64, requires_grad=True), torch.randn(R, i, dtype=torch.float64, requires_grad=True)]
    assert f(*inputs).dtype == torch.float64
    assert torch.autograd.gradcheck(f, inputs)


def test_autocast_does_not_round_the_penalty():
    # The docs' loop adds allocator.orthogonal_loss() to a loss computed under torch.autocast. With
    # bf16 Grams of near-orthonormal factors (what the penalty drives them to) the loss came out 26 %
    # high and dP 39 % off; the penalty must measure in fp32 whatever the caller's autocast.
    torch.manual_seed(1)
    mods = []
    for _ in range(3):
        m = FlexLinear(48, 40, 8, 8, 4.0)
        with torch.no_grad():
            m.P.copy_(torch.linalg.qr(torch.randn(40, 8))[0] + 1e-3 * torch.randn(40, 8))
            m.Q.copy_((torch.linalg.qr(torch.randn(48, 8))[0] + 1e-3 * torch.randn(48, 8)).t())
        mods.append(m)
    ref_loss, ref_grads = reference(mods, GAMMA)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = orthogonal_loss(mods, GAMMA)
        loss.backward()
    assert loss.dtype == torch.float32
    assert_close(loss, ref_loss, "loss under autocast", 1e-5)
    for k, (m, (rP, rQ)) in enumerate(zip(mods, ref_grads)):
        assert_close(m.P.grad, rP, f"module {k} dP under autocast", 1e-4)
        assert_close(m.Q.grad, rQ, f"module {k} dQ under autocast", 1e-4)
        m.P.grad = m.Q.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        add_orthogonal_grad_(mods, GAMMA)
    for k, (m, (rP, rQ)) in enumerate(zip(mods, ref_grads)):
        assert_close(m.P.grad, rP, f"module {k} in-place dP under autocast", 1e-4)
        assert_close(m.Q.grad, rQ, f"module {k} in-place dQ under autocast", 1e-4)
