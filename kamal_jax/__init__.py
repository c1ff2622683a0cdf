"""kamal_jax: adaptive knowledge amalgamation of heterogeneous teachers in JAX/Flax.

Shen et al., "Customizing Student Networks From Heterogeneous Teachers via Adaptive
Knowledge Amalgamation", ICCV 2019.
"""
from kamal_jax import ambiguity, amalgamate, losses, tasks
from kamal_jax.predict import Model, Predictions, load

__all__ = ["Model", "Predictions", "ambiguity", "amalgamate", "load", "losses", "tasks"]
__version__ = "0.1.0"
