"""Models built on kvattn, installed with the package.

`kvattn.models.transformer`: a decoder as plain functions (`Config`,
`init_params`, `init_caches`, `step_fn` for `kvattn.generate`, `forward`
without a cache).
"""
