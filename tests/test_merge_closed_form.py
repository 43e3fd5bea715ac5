import pytest
import torch

from mima.merge.closed_form import FactorizedGram, closed_form_merge, factorize_gram, merged_values


def _data(d=16, d_out=12, m=4, s=40, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(d_out, d, generator=g, dtype=dtype)
    c = torch.randn(m, d, generator=g, dtype=dtype)
    v = torch.randn(m, d_out, generator=g, dtype=dtype)
    c_reg = torch.randn(s, d, generator=g, dtype=dtype)
    return w0, c, v, c_reg


def _objective(w, w0, c_reg, ridge):
    delta = w - w0
    return (delta @ c_reg.T).pow(2).sum() + ridge * delta.pow(2).sum()


def _rel_constraint_err(w, c, v):
    return ((w @ c.T - v.T).norm() / v.norm()).item()


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_returns_w0_when_values_come_from_w0(dtype, atol):
    w0, c, _, c_reg = _data(dtype=dtype)
    w_hat = closed_form_merge(w0, c, c @ w0.T, c_reg)
    assert w_hat.dtype == dtype
    torch.testing.assert_close(w_hat, w0, atol=atol, rtol=0)


def test_returns_w0_via_merged_values_all_adapted_equal_w0():
    w0, _, _, c_reg = _data()
    g = torch.Generator().manual_seed(1)
    targets = [torch.randn(2, 16, generator=g, dtype=torch.float64) for _ in range(3)]
    c, v = merged_values([w0.clone() for _ in targets], targets)
    assert c.shape == (6, 16) and v.shape == (6, 12)
    torch.testing.assert_close(closed_form_merge(w0, c, v, c_reg), w0, atol=1e-12, rtol=0)


def test_constraint_satisfied():
    w0, c, v, c_reg = _data()
    w_hat = closed_form_merge(w0, c, v, c_reg)
    assert w_hat.shape == w0.shape
    assert _rel_constraint_err(w_hat, c, v) < 1e-6


def test_merged_values_stacks_per_concept_values():
    w0, _, _, _ = _data()
    g = torch.Generator().manual_seed(2)
    ws = [w0 + 0.1 * torch.randn(w0.shape, generator=g, dtype=torch.float64) for _ in range(2)]
    cs = [torch.randn(3, 16, generator=g, dtype=torch.float64), torch.randn(1, 16, generator=g, dtype=torch.float64)]
    c, v = merged_values(ws, cs)
    torch.testing.assert_close(v[:3], cs[0] @ ws[0].T)
    torch.testing.assert_close(v[3:], cs[1] @ ws[1].T)


def test_minimality_against_null_space_perturbations():
    ridge = 1e-2
    w0, c, v, c_reg = _data()
    w_hat = closed_form_merge(w0, c, v, c_reg, ridge=ridge)
    proj = torch.eye(16, dtype=torch.float64) - c.T @ torch.linalg.solve(c @ c.T, c)  # projector onto null(C)
    base = _objective(w_hat, w0, c_reg, ridge)
    g = torch.Generator().manual_seed(3)
    for scale in (1e-3, 1e-1, 1.0):
        delta = scale * torch.randn(12, 16, generator=g, dtype=torch.float64) @ proj
        assert (delta @ c.T).abs().max() < 1e-10
        assert _objective(w_hat + delta, w0, c_reg, ridge) > base


def test_gradcheck():
    w0, c, v, c_reg = _data(d=5, d_out=3, m=2, s=7)
    args = tuple(t.clone().requires_grad_(True) for t in (w0, c, v))
    assert torch.autograd.gradcheck(lambda a, b, e: closed_form_merge(a, b, e, c_reg, ridge=0.1), args)


def test_gradcheck_through_merged_values():
    w0, c, _, c_reg = _data(d=5, d_out=3, m=2, s=7)
    w1 = (w0 + 0.1).requires_grad_(True)

    def fn(w_n):
        cc, vv = merged_values([w_n], [c])
        return closed_form_merge(w0, cc, vv, c_reg)

    assert torch.autograd.gradcheck(fn, (w1,))


def test_singular_reg_gram_is_finite():
    w0, c, v, c_reg = _data(s=5)  # s < d
    w_hat = closed_form_merge(w0, c, v, c_reg)
    assert torch.isfinite(w_hat).all() and _rel_constraint_err(w_hat, c, v) < 1e-6
    dup_bank = torch.cat([c_reg, c_reg, c_reg[:2]], dim=0)
    w_dup = closed_form_merge(w0, c, v, dup_bank)
    assert torch.isfinite(w_dup).all() and _rel_constraint_err(w_dup, c, v) < 1e-6


def test_duplicated_targets_are_finite_and_constraint_met():
    w0, c, v, c_reg = _data()
    c2, v2 = torch.cat([c, c[:2]]), torch.cat([v, v[:2]])
    w_hat = closed_form_merge(w0, c2, v2, c_reg)
    assert torch.isfinite(w_hat).all()
    assert _rel_constraint_err(w_hat, c2, v2) < 1e-6
    torch.testing.assert_close(w_hat, closed_form_merge(w0, c, v, c_reg), atol=1e-6, rtol=1e-6)


def test_factorized_gram_reuse_matches_raw_bank():
    w0, c, v, c_reg = _data()
    gram = factorize_gram(c_reg, ridge=1e-2)
    assert isinstance(gram, FactorizedGram) and gram.cholesky.dtype == torch.float64
    rhs = torch.randn(16, 3, dtype=torch.float64)
    torch.testing.assert_close(gram.solve(rhs), torch.linalg.solve(c_reg.T @ c_reg + 1e-2 * torch.eye(16), rhs))
    expected = closed_form_merge(w0, c, v, c_reg, ridge=1e-2)
    torch.testing.assert_close(closed_form_merge(w0, c, v, gram, ridge=123.0), expected, atol=1e-12, rtol=0)


def test_bad_shapes_raise():
    w0, c, v, c_reg = _data()
    with pytest.raises(ValueError, match=r"\(5, 16\)"):
        closed_form_merge(w0, c, torch.zeros(5, 16, dtype=torch.float64), c_reg)
    with pytest.raises(ValueError, match=r"\(4, 15\)"):
        closed_form_merge(w0, c[:, :15], v, c_reg)
    with pytest.raises(ValueError, match=r"\(15, 15\)"):
        closed_form_merge(w0, c, v, c_reg[:, :15])
    with pytest.raises(ValueError, match=r"\(12, 16\)"):
        merged_values([w0, w0[:, :8]], [c, c[:, :8]])
    with pytest.raises(ValueError):
        merged_values([w0], [])


@pytest.mark.parametrize("ridge", [0.0, -1.0])
def test_nonpositive_ridge_raises(ridge):
    w0, c, v, c_reg = _data()
    with pytest.raises(ValueError, match="ridge"):
        factorize_gram(c_reg, ridge=ridge)
    with pytest.raises(ValueError, match="ridge"):
        closed_form_merge(w0, c, v, c_reg, ridge=ridge)
