"""starflow2-jax: a JAX/Flax implementation of Apple's STARFlow2.

Subpackages (import them explicitly; `import starflow2_jax` stays cheap and pulls in no JAX):
`nn` shared building blocks, `flow` TarFlow / STARFlow autoregressive flows, `convert` PyTorch
import/export, `parallel` meshes and sharding rules, `cli` the `starflow2` command; `atomic` writes
outputs whole or not at all, `config_files` loads experiment files.
"""

__version__ = "0.1.0"
