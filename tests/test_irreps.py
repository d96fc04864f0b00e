"""The block tensor product against a dense Clebsch-Gordan contraction, path by path."""

import pytest
import torch

from mlip.nn.irreps import TensorProduct, clebsch_gordan


def dense_reference(tp: TensorProduct, left, right, weights):
    """out[l3] = concat over paths of  sum_ij CG[i,j,k] a[i] b[j] (x weight), in the product's path order."""
    grouped = [[] for _ in tp.irreps_out]
    for k, (i1, i2, d1, d2, d3, out, _) in enumerate(tp.paths):
        cg = clebsch_gordan((d1 - 1) // 2, (d2 - 1) // 2, (d3 - 1) // 2)
        c = torch.einsum("ijk,irc,jrc->krc", cg, left[i1], right[i2].expand(d2, -1, left[i1].shape[2]))
        grouped[out].append(c * weights[k] if weights is not None else c)
    return [torch.cat(blocks, dim=2) for blocks in grouped]


@pytest.mark.parametrize("right_channels", [1, 4], ids=["shared-right", "channelwise"])
@pytest.mark.parametrize("weighted", [False, True])
def test_tensor_product_matches_dense_contraction(right_channels, weighted):
    """Every path kind (scalar, dot, cross, general) up to l = 3, both parities, value and gradient."""
    irreps = [(l, p) for l in range(4) for p in (1, -1)]
    irreps_sh = [(l, (-1) ** l) for l in range(4)]
    tp = TensorProduct(irreps, irreps_sh, irreps)
    assert len({path[6] for path in tp.paths}) == 5, "not every kind of path is exercised"
    rows, channels = 7, 4
    generator = torch.Generator().manual_seed(0)
    left = [torch.randn(2 * l + 1, rows, channels, dtype=torch.float64, generator=generator, requires_grad=True)
            for l, _ in irreps]
    right = [torch.randn(2 * l + 1, rows, right_channels, dtype=torch.float64, generator=generator,
                         requires_grad=True) for l, _ in irreps_sh]
    weights = torch.randn(tp.num_paths, rows, channels, dtype=torch.float64, generator=generator) if weighted else None

    ours, reference = tp(left, right, weights), dense_reference(tp, left, right, weights)
    probes = [torch.randn(block.shape, dtype=torch.float64, generator=generator) for block in reference]
    for block, expected in zip(ours, reference):
        torch.testing.assert_close(block, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(sum((b * p).sum() for b, p in zip(ours, probes)), left + right)
    expected_grads = torch.autograd.grad(sum((b * p).sum() for b, p in zip(reference, probes)), left + right)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)


def test_tensor_product_on_harmonics_may_skip_the_constant_scalar():
    """right_scalar_is_one (NequIP: the right operand is Y(r) with Y_0 = 1) passes the left block
    through the paths with Y_0 unmultiplied: same products, same gradients with respect to the left
    blocks and the edge vectors as the full contraction."""
    from mlip.nn.harmonics import SphericalHarmonics
    from mlip.nn.irreps import split_blocks

    irreps = [(l, p) for l in range(3) for p in (1, -1)]
    irreps_sh = [(l, (-1) ** l) for l in range(3)]
    tp = TensorProduct(irreps, irreps_sh, irreps, right_scalar_is_one=True)
    rows, channels = 7, 4
    generator = torch.Generator().manual_seed(1)
    left = [torch.randn(2 * l + 1, rows, channels, dtype=torch.float64, generator=generator, requires_grad=True)
            for l, _ in irreps]
    vectors = torch.randn(rows, 3, dtype=torch.float64, generator=generator).requires_grad_(True)
    sh = split_blocks(SphericalHarmonics(2)(vectors), 2)
    weights = torch.randn(tp.num_paths, rows, channels, dtype=torch.float64, generator=generator)

    ours, reference = tp(left, sh, weights), dense_reference(tp, left, sh, weights)
    probes = [torch.randn(block.shape, dtype=torch.float64, generator=generator) for block in reference]
    for block, expected in zip(ours, reference):
        torch.testing.assert_close(block, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(sum((b * p).sum() for b, p in zip(ours, probes)), left + [vectors], retain_graph=True)
    expected_grads = torch.autograd.grad(sum((b * p).sum() for b, p in zip(reference, probes)), left + [vectors])
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("l_max", [0, 1, 2, 3, 4, 6])
def test_spherical_harmonics_match_e3nn(l_max):
    """Our recursion reproduces e3nn's SphericalHarmonics (normalize=True, component
    normalization), first and second derivatives included (forces and force training)."""
    from e3nn import o3

    from mlip.nn.harmonics import SphericalHarmonics

    ours = torch.jit.script(SphericalHarmonics(l_max))
    reference = o3.SphericalHarmonics(o3.Irreps.spherical_harmonics(l_max), normalize=True,
                                      normalization="component")
    vectors = (torch.randn(40, 3, dtype=torch.float64) * 2.0).requires_grad_(True)
    got, want = ours(vectors), reference(vectors).t().unsqueeze(-1)
    assert got.shape == ((l_max + 1) ** 2, 40, 1)
    assert torch.allclose(got, want, atol=1e-12)
    assert torch.allclose(got.square().sum(0), torch.full((40, 1), (l_max + 1.0) ** 2, dtype=torch.float64))
    if l_max == 0:
        return
    weights = torch.randn_like(got)
    grads = [torch.autograd.grad((y * weights).sum() ** 2, vectors, create_graph=True)[0] for y in (got, want)]
    assert torch.allclose(grads[0], grads[1], atol=1e-10)
    second = [torch.autograd.grad(g.sum(), vectors, retain_graph=True)[0] for g in grads]
    assert torch.allclose(second[0], second[1], atol=1e-8)
    float32 = ours(vectors.detach().float())
    assert float32.dtype == torch.float32 and torch.allclose(float32.double(), want, atol=1e-5)
