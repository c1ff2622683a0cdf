"""kamal_jax's amalgamation step against an independent PyTorch implementation of the
method (benchmarks/side_by_side.py, the other side of the speed tables): from the
same weights, both must compute the same loss terms, and after the same gradient
steps still agree, which checks the gradients and the optimizer too."""
import dataclasses

import numpy as np
import pytest

from benchmarks import side_by_side as sbs

TERMS = {"feature": "feature_loss", "logit": "logit_loss", "weight_norm": "weight_norm"}


@pytest.mark.parametrize("stage", ["stage1", pytest.param("stage2", marks=pytest.mark.slow)])
def test_kamal_jax_and_pytorch_take_the_same_steps(stage):
  size = dataclasses.replace(sbs.SIZES["digits"], batch=16)
  problem = sbs.stage1(size, 2) if stage == "stage1" else sbs.stage2(size)
  runs = sbs.steps(problem)
  for step in range(3):
    metrics, terms = runs["jax"](), runs["torch"]()
    assert len(terms) == (3 if stage == "stage1" else 4)
    # The first step compares the initial losses; later ones, the updates as well
    # (float32 sums in another order drift apart by ~1e-5 per step).
    rtol = 1e-5 if step == 0 else 1e-3
    for name, value in terms.items():
      group, term = name.split("/")
      np.testing.assert_allclose(np.asarray(metrics[f"{group}/{TERMS[term]}"]),
                                 value.item(), rtol=rtol, err_msg=f"{name} at step {step}")
    np.testing.assert_allclose(np.asarray(metrics["loss"]),
                               sum(v.item() for v in terms.values()), rtol=rtol)
