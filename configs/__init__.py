"""Configs, one `get_config(arg)` per setup; installed as `kamal_jax.configs`, so a
config of your own can build on them: `from kamal_jax.configs import digits`."""
