"""model/layers.matmul: einsum's values and gradients, whichever operand its backward transposes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.layers import matmul

# The model's dots: (equation, x shape, kernel shape, kernel input axes, dtype, out_type).
F32, BF16 = jnp.float32, jnp.bfloat16
CASES = [
    ("bte,em->btm", (2, 3, 4), (4, 8), 1, F32, None),  # MLP up: x transposed in dkernel
    ("btm,me->bte", (2, 3, 8), (8, 4), 1, F32, None),  # MLP down: the output gradient
    ("bthd,hde->bte", (2, 3, 2, 3), (2, 3, 4), 2, F32, None),
    ("bte,ev->btv", (2, 3, 4), (4, 16), 1, BF16, F32),  # the output head: float32 logits
]


@pytest.mark.parametrize("equation,x_shape,kernel_shape,num_in,dtype,out_type", CASES)
def test_matmul_matches_einsum_and_its_gradients(
    equation, x_shape, kernel_shape, num_in, dtype, out_type
):
    kx, kk, kg = jax.random.split(jax.random.PRNGKey(0), 3)
    x, kernel = (jax.random.normal(k, shape, dtype) for k, shape in [(kx, x_shape),
                                                                     (kk, kernel_shape)])
    einsum = lambda x, k: jnp.einsum(equation, x, k, preferred_element_type=out_type)
    y_ref, vjp_ref = jax.vjp(einsum, x, kernel)
    y, vjp = jax.vjp(lambda x, k: matmul(equation, x, k, num_in, out_type), x, kernel)
    dy = jax.random.normal(kg, y.shape, y.dtype)
    assert y.dtype == (out_type or dtype)
    np.testing.assert_array_equal(y, y_ref)
    tolerance = 1e-5 if dtype == F32 else 2e-2
    for got, want in zip(vjp(dy), vjp_ref(dy)):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(
            np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tolerance,
            atol=tolerance,
        )
