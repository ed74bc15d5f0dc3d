"""Text and token ids for the server: tokenizers and chat templates.

`Tokenizer` is what the HTTP app needs of one (`encode`, `decode`):
`CharTokenizer` for the bundled char-level model, `HFTokenizer` for a
checkpoint's `tokenizer.json`. `ChatTemplate` renders a conversation as the
prompt's text: a checkpoint's Jinja `chat_template` (read with
`ChatTemplate.from_checkpoint`, rendered in a sandbox as transformers
does; needs jinja2, in the `serve` extra), or `FALLBACK` for models without
one.
"""

from __future__ import annotations

import datetime
import json
import pathlib
from typing import Any, Mapping, Protocol, Sequence

# Tokenizers. ---------------------------------------------------------------


class Tokenizer(Protocol):
  """Text <-> token ids, as the app needs them.

  encode: `add_special_tokens` adds what the tokenizer puts around a text
    (a BOS id); chat prompts, whose template writes them, pass False.
  decode: the text of `ids`, special tokens left out.
  """
  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    ...

  def decode(self, ids: Sequence[int]) -> str:
    ...


class CharTokenizer:
  """The char-level model's `charlm.Vocab` as a `Tokenizer`; it has no special tokens.

  A character outside the vocabulary is a ValueError (the vocabulary would
  turn it into padding, id 0).
  """
  def __init__(self, vocab):
    self.vocab = vocab
    self._known = frozenset(vocab.chars[1:])

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    del add_special_tokens
    unknown = sorted(set(text) - self._known)
    if unknown:
      raise ValueError(f"the text should use the model's {len(self._known)} characters: but it "
                       f"has {''.join(unknown)!r}")
    return self.vocab.encode(text).tolist()

  def decode(self, ids: Sequence[int]) -> str:
    return self.vocab.decode(ids)


class HFTokenizer:
  """A `tokenizers.Tokenizer` (a checkpoint's tokenizer.json) as a `Tokenizer`."""
  def __init__(self, tokenizer):
    self.tokenizer = tokenizer

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

  def decode(self, ids: Sequence[int]) -> str:
    return self.tokenizer.decode(list(ids), skip_special_tokens=True)


# Chat templates. -----------------------------------------------------------


class ChatTemplate:
  """Renders a conversation as the prompt's text.

  Args:
    source: a Jinja chat template (a checkpoint's `chat_template`; needs
      jinja2), rendered as transformers does, with `messages`,
      `add_generation_prompt=True` and `special_tokens` (bos_token, ...).
      None: `FALLBACK`, for models without one (the bundled char-level
      model): each message becomes "<role>: <content>\\n" ("<role> (<name>):
      ..." when it has a name) and the prompt ends "assistant: ". The
      fallback's text is encoded with the tokenizer's special tokens; a
      template's without (it writes its own).
    special_tokens: names the template may use, as {"bos_token": "<s>"}.
  """
  def __init__(self, source: str | None = None, special_tokens: Mapping[str, str] | None = None):
    self.source = source
    self.special_tokens = dict(special_tokens or {})
    self.add_special_tokens = source is None
    self._template = None if source is None else _compile_jinja(source)

  def render(self, messages: Sequence[Mapping[str, Any]]) -> str:
    """The prompt for `messages` ([{"role", "content"[, "name"]}]), ready for the reply."""
    if self._template is None:
      lines = [
          f"{m['role']}{' (' + m['name'] + ')' if m.get('name') else ''}: {m['content']}\n"
          for m in messages
      ]
      return "".join(lines) + "assistant: "
    return self._template.render(messages=list(messages), add_generation_prompt=True, tools=None,
                                 **self.special_tokens)

  @classmethod
  def from_checkpoint(cls, directory: str | pathlib.Path) -> ChatTemplate | None:
    """The template of a Hugging Face checkpoint directory, or None if it has none.

    `chat_template.jinja` if present, else tokenizer_config.json's
    `chat_template` (a string, or named templates: "default" is taken); the
    special tokens come from tokenizer_config.json.
    """
    directory = pathlib.Path(directory)
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    source = config.get("chat_template")
    if isinstance(source, list):
      source = next((t.get("template") for t in source if t.get("name") == "default"), None)
    if (directory / "chat_template.jinja").is_file():
      source = (directory / "chat_template.jinja").read_text()
    if not source:
      return None
    special = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
      token = config.get(name)
      if isinstance(token, dict):  # An AddedToken, written out.
        token = token.get("content")
      if isinstance(token, str):
        special[name] = token
    return cls(source, special)


FALLBACK = ChatTemplate()


class TemplateError(ValueError):
  """A template's `raise_exception(...)`: the conversation is one it refuses."""


def _compile_jinja(source: str):
  try:
    from jinja2 import ext
    from jinja2 import sandbox
  except ImportError as e:
    raise ImportError("a chat template needs jinja2: pip install kvattn[serve]") from e

  def raise_exception(message):
    raise TemplateError(message)

  def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  # transformers' environment: sandboxed, trimmed blocks, loop controls, these helpers.
  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                              extensions=[ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env.from_string(source)
