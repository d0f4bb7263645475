"""model/layers.matmul: einsum's values and gradients, whichever operand its backward transposes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.layers import matmul

# The Dense equations of the model: (equation, x shape, kernel shape, kernel input axes).
CASES = [
    ("bte,em->btm", (2, 3, 4), (4, 8), 1),  # MLP up: x transposed in the kernel gradient
    ("btm,me->bte", (2, 3, 8), (8, 4), 1),  # MLP down: the output gradient transposed
    ("bthd,hde->bte", (2, 3, 2, 3), (2, 3, 4), 2),
]


@pytest.mark.parametrize("equation,x_shape,kernel_shape,num_in", CASES)
def test_matmul_matches_einsum_and_its_gradients(equation, x_shape, kernel_shape, num_in):
    kx, kk, kg = jax.random.split(jax.random.PRNGKey(0), 3)
    x, kernel = jax.random.normal(kx, x_shape), jax.random.normal(kk, kernel_shape)
    y_ref, vjp_ref = jax.vjp(lambda x, k: jnp.einsum(equation, x, k), x, kernel)
    y, vjp = jax.vjp(lambda x, k: matmul(equation, x, k, num_in), x, kernel)
    dy = jax.random.normal(kg, y.shape)
    np.testing.assert_array_equal(y, y_ref)
    for got, want in zip(vjp(dy), vjp_ref(dy)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
