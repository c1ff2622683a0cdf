"""Interoperability with other ecosystems, installed as `kamal_jax.third_party`.

Nothing in the core package imports from here at import time, so the core never
depends on PyTorch or any other framework.
"""
