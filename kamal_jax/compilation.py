"""How many programs a run compiles and what that costs, from `jax.monitoring` events.

XLA compiles each distinct program once per process, or loads it from the persistent
compilation cache; on small work these seconds, not the steps, decide the wall time.
"""
import collections
import functools

import jax

__all__ = ["listen", "since", "totals"]

_DURATIONS = {  # event -> name in the counts
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
    # XLA compilation, or a load from the persistent cache
    "/jax/core/compile/backend_compile_duration": "compile",
}
_CACHE_HITS = "/jax/compilation_cache/cache_hits"
_counts = collections.Counter()


def _on_duration(event: str, seconds: float, **unused):
  name = _DURATIONS.get(event)
  if name:
    _counts[name] += 1
    _counts[f"{name}_seconds"] += seconds


def _on_event(event: str, **unused):
  if event == _CACHE_HITS:
    _counts["cache_hits"] += 1


@functools.cache
def listen():
  """Starts counting (once per process); compilations before this call are missed."""
  jax.monitoring.register_event_duration_secs_listener(_on_duration)
  jax.monitoring.register_event_listener(_on_event)


def totals() -> collections.Counter:
  listen()
  return collections.Counter(_counts)


def since(before: collections.Counter) -> dict:
  """What was compiled after `before = totals()`: programs built by XLA, programs
  loaded from the persistent cache, and seconds tracing, lowering and compiling
  (loads included)."""
  now = totals()
  delta = {k: now[k] - before[k] for k in set(now) | set(before)}
  return {"compiled": delta.get("compile", 0) - delta.get("cache_hits", 0),
          "from_cache": delta.get("cache_hits", 0),
          "compile_seconds": round(delta.get("compile_seconds", 0.0), 2),
          "trace_and_lower_seconds": round(delta.get("trace_seconds", 0.0)
                                           + delta.get("lower_seconds", 0.0), 2)}
