"""Models built on kvattn, installed with the package.

  * `transformer`: a pre-norm decoder as plain functions (`Config`,
    `init_params`, `init_caches`, `step_fn` for `kvattn.generate`, `forward`
    without a cache, for training): GPT-2, the Llama family, Qwen3, Gemma 1-3,
    Phi-3 and OLMo 2 variants in one `Config`.
  * `load(directory, dtype=np.float32)`: any supported Hugging Face
    checkpoint, its loader picked from `config.json` (`loaders.FAMILIES`);
    `llama` (Llama, Mistral, Qwen2, Qwen3), `gemma`, `phi3`, `olmo2`, `gpt2`:
    the loaders, onto `transformer`; `checkpoint`: the reader they share (the
    `[models]` extra).
  * `charlm`: the bundled character-level model (`charlm.load()`), its
    vocabulary and checkpoint format; `training`: its training recipe
    (corpus, loss, AdamW); `runner`: timed generation for the examples.
"""


def __getattr__(name: str):
  # `load` is re-exported on first use: `loaders` imports the loaders, which
  # import `transformer`, so an import here would make every
  # `from kvattn.models import transformer` read them too (and a cycle in BUILD).
  if name == "load":
    from kvattn.models.loaders import load  # pylint: disable=import-outside-toplevel
    return load
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
