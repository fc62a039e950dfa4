"""medusa_jax: Medusa decoding heads and tree verification for Llama-family models in JAX.

Conventions used across the package
-----------------------------------
Shape letters (suffixes such as ``h_BxLxD``):
  B batch, L length (tokens in a call), S KV-cache capacity, D model width, H query heads,
  K kv heads, E head dim, F MLP width, V vocabulary, M Medusa heads, N tree nodes,
  C candidate paths, A accepted length.

Parameters are ONE pytree shared by training and decoding::

    {'base': {...backbone...}, 'medusa': {...heads...}}

Every array has a logical axis-name tuple in a parallel pytree (``model.param_axes``,
``heads.param_axes``); ``sharding.py`` maps logical names to mesh axes with rules from the config.

The KV cache is an explicit fixed-capacity pytree (``model.init_cache``): per layer ``k``/``v``
of shape [B, K, S, E] plus ``index`` [B] int32, the number of valid rows of each sequence.
``model.forward`` writes the L new tokens at rows ``index[b] .. index[b]+L-1`` and takes the
positions (for RoPE) and the [B, L, S] attention mask as inputs, so a Medusa tree verification is
an ordinary forward with a tree mask.
"""

__version__ = "0.1.0"
