"""The full digits default and the accuracy targets it must reach (slow: ~2 min)."""
import pytest

from configs import digits
from kamal_jax import pipeline


@pytest.mark.slow
def test_digits_default_reaches_its_targets(data_dir, tmp_path):
  config = digits.get_config()
  config.data.data_dir = data_dir
  result = pipeline.train_and_evaluate(config, str(tmp_path))
  teachers = {t["name"]: t for t in result["teachers"]}
  assert all(t["accuracy"] >= 0.95 for t in teachers.values())
  for component in result["components"]:
    worse = min(teachers[t]["accuracy_per_part"][component["name"]]
                for t in component["teachers"])
    assert component["accuracy"] >= worse - 0.01
    assert result["student"]["accuracy_per_part"][component["name"]] >= \
        component["accuracy"] - 0.02
  assert result["student"]["accuracy_joint"] >= 0.95
