"""What a run has trained: each network as its module, variables and head widths."""
import dataclasses

from kamal_jax import teachers

__all__ = ["Network", "Networks"]


@dataclasses.dataclass(frozen=True)
class Network:
  module: object  # a Flax module
  variables: dict  # {'params', 'batch_stats'}, host arrays
  head_sizes: tuple[int, ...]  # its heads' widths, side by side (a rest logit counted)


@dataclasses.dataclass(frozen=True)
class Networks:
  """What a run has trained so far."""
  teachers: list[teachers.TeacherStack]  # the pool, one stack per architecture
  components: list[Network] = dataclasses.field(default_factory=list)  # one per group
  student: Network | None = None
