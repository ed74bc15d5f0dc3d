"""Models built on kvattn, installed with the package.

  * `transformer`: a pre-norm decoder as plain functions (`Config`,
    `init_params`, `init_caches`, `step_fn` for `kvattn.generate`, `forward`
    without a cache, for training), GPT-2 and Llama-family variants.
  * `llama`, `gpt2`: Hugging Face checkpoints onto `transformer`;
    `checkpoint`: the reader they share (the `[models]` extra).
  * `charlm`: the bundled character-level model (`charlm.load()`), its
    vocabulary and checkpoint format; `training`: its training recipe
    (corpus, loss, AdamW); `runner`: timed generation for the examples.
"""
