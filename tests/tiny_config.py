"""The digits default shrunk for tests: quarter-width nets, a few steps, small batches.

Tests that build networks use these same shapes, so compiled programs are shared (in
memory, and through the compilation cache). The argument is the tfds data directory:
  --config=tests/tiny_config.py:/path/to/tfds
"""
from kamal_jax.configs import digits


def get_config(data_dir: str = ""):
  c = digits.get_config()
  c.data.data_dir = data_dir
  c.models.teacher_width_scale = 0.25
  c.models.student_width_scale = 0.3
  for stage in (c.teacher_training, c.stage1, c.stage2):
    stage.steps = 6
    stage.batch_size = 16
  c.stage1.bridge_widths = (2, 2, 4, 8, 16)
  c.eval_batch_size = 128
  c.log_every = 2
  c.checkpoint_every = 2
  c.export_graphs = ()  # tests/test_export.py exports the graphs once
  return c
