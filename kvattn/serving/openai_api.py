"""An OpenAI-compatible HTTP app over an `AsyncEngine` (FastAPI; `pip install kvattn[serve]`).

  app = openai_api.build_app(async_engine, openai_api.CharTokenizer(vocab), "charlm")
  with async_engine:
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes:
  GET  /v1/models            the one model served.
  POST /v1/completions       prompt (a string or a list of token ids), max_tokens,
                             temperature, top_p, n, stream, stream_options, logprobs (an
                             int: the legacy tokens / token_logprobs / top_logprobs /
                             text_offset), stop, seed, user; and vLLM's top_k, min_p,
                             stop_token_ids, ignore_eos.
  POST /v1/chat/completions  messages, the same settings (max_completion_tokens as well;
                             logprobs a bool with top_logprobs), rendered with the chat
                             template.
  GET  /metrics              `Engine.metrics()` as JSON.
  GET  /health               200 while the step thread runs, else 503.

Nothing a request asks for is dropped silently: a parameter the server does
not know, or one it cannot honour exactly (presence_penalty or
frequency_penalty other than 0, best_of, logit_bias, echo, suffix, tools, a
response_format other than text, a batch of prompts, ...), gets HTTP 400
with OpenAI's error body, `{"error": {"message", "type":
"invalid_request_error", "param", "code"}}`; so does anything the engine
refuses (`Engine.check_request`), with its message. Settings left out take
OpenAI's defaults (max_tokens 16 for completions; for chat, what the
engine's max_len leaves after the prompt).

Stop strings are matched in the decoded text: the output ends at the first
one (the text stops before it; the tokens up to the one that completed it
are counted and given logprobs) and the request is cancelled. A streamed
output holds back text that may be the start of a stop string, or an
unfinished UTF-8 character, until the next token settles it; the chunks
concatenate to the text a non-streaming request returns. A client that
disconnects, streaming or waiting for the whole reply, cancels its request,
whose slots and pages are freed at the next step.

Text and token ids meet in a `kvattn.serving.text.Tokenizer`
(`CharTokenizer` for the bundled char-level model, `HFTokenizer` for a
checkpoint's `tokenizer.json`); `kvattn.serving.text.ChatTemplate` renders
messages.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
import uuid
from typing import Any, NamedTuple, Sequence

try:
  import fastapi
  from fastapi import responses
except ImportError as e:  # The server's packages are an extra; the engine does not need them.
  raise ImportError("kvattn.serving.openai_api needs FastAPI and uvicorn: pip install "
                    "kvattn[serve]") from e

from kvattn._checks import is_int
from kvattn.serving.async_engine import AsyncEngine
from kvattn.serving.async_engine import RequestStream
from kvattn.serving.engine import Logprob
from kvattn.serving.settings import SamplingParams
from kvattn.serving.text import FALLBACK, ChatTemplate, Tokenizer

# Prompt tokens decoded before an output's, so that its first token decodes as it would in
# place (a SentencePiece tokenizer drops the leading space of a text's first token).
_CONTEXT_TOKENS = 5
# What OpenAI writes for a log-probability that is not finite (JSON has no -Infinity).
_FLOOR = -9999.0

# Errors. -------------------------------------------------------------------


class ApiError(Exception):
  """A request the server refuses: the HTTP status and OpenAI's error body."""
  def __init__(self, message: str, param: str | None = None, status: int = 400,
               code: str | None = None, kind: str = "invalid_request_error"):
    super().__init__(message)
    self.message, self.param, self.status, self.code, self.kind = message, param, status, code, kind

  def body(self) -> dict[str, Any]:
    return dict(error=dict(message=self.message, type=self.kind, param=self.param, code=self.code))


def _engine_error(error: Exception, params: frozenset[str], prompt_param: str) -> ApiError:
  """The engine's ValueError or TypeError as a 400; `param` is the setting its message names."""
  message = str(error)
  if message.startswith("prompt length + max_tokens"):  # The prompt fits; the output may not.
    return ApiError(message, "max_tokens")
  first = re.match(r"\w+", message)
  name = first.group(0) if first else None
  param = prompt_param if name == "prompt" else name if name in params else None
  return ApiError(message, param)


# Reading a request. --------------------------------------------------------

# Parameters the server knows but cannot honour, and the one value of each that changes nothing
# (the only value accepted).
_NEUTRAL = {
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "repetition_penalty": 1,
    "best_of": 1,
    "logit_bias": {},
    "echo": False,
    "suffix": "",
    "min_tokens": 0,
    "tools": [],
    "functions": [],
    "tool_choice": "none",
    "function_call": "none",
    "response_format": dict(type="text"),
}
_SAMPLING = frozenset(
    ("temperature", "top_p", "n", "seed", "stop", "stream", "stream_options", "user", "top_k",
     "min_p", "stop_token_ids", "ignore_eos", "max_tokens", "presence_penalty", "frequency_penalty",
     "repetition_penalty", "logit_bias", "min_tokens"))
_COMPLETION_PARAMS = _SAMPLING | {"model", "prompt", "logprobs", "best_of", "echo", "suffix"}
_CHAT_PARAMS = _SAMPLING | {
    "model", "messages", "logprobs", "top_logprobs", "max_completion_tokens", "tools", "functions",
    "tool_choice", "function_call", "parallel_tool_calls", "response_format"
}
_ROLES = ("system", "developer", "user", "assistant")


class _Job(NamedTuple):
  """A checked request: the prompt's ids, the engine's settings and what the reply needs."""

  prompt_ids: list[int]
  params: SamplingParams
  stops: tuple[str, ...]
  stream: bool
  include_usage: bool


def _get(body, name, kind, what, default=None):
  """body[name] (null or absent: default); ApiError unless it is a `kind`."""
  value = body.get(name)
  if value is None:
    return default
  if kind is int:
    ok = is_int(value)
  elif kind is float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  else:
    ok = isinstance(value, kind)
  if not ok:
    raise ApiError(f"{name} should be {what}: but got {value!r}", name)
  return value


def _check_names(body: Any, known: frozenset[str], model_name: str) -> None:
  if not isinstance(body, dict):
    raise ApiError(f"the request body should be a JSON object: but got {type(body).__name__}")
  unknown = sorted(set(body) - known)
  if unknown:
    raise ApiError(
        f"unknown or unsupported parameter {unknown[0]!r} (this server refuses what it "
        f"cannot honour)", unknown[0])
  for name, neutral in _NEUTRAL.items():
    value = body.get(name)
    if value is not None and (value != neutral
                              or isinstance(value, bool) != isinstance(neutral, bool)):
      raise ApiError(f"{name} is not supported (only {json.dumps(neutral)}): but got {value!r}",
                     name)
  if body.get("best_of") is not None and body.get("n") not in (None, 1):
    raise ApiError(
        "best_of should be at least n (best_of is not supported): but got "
        f"best_of={body['best_of']!r}, n={body['n']!r}", "best_of")
  model = body.get("model")
  if model != model_name:
    if model is None:
      raise ApiError("model is required", "model")
    raise ApiError(f"the model {model!r} does not exist: this server serves {model_name!r}",
                   "model", 404, "model_not_found")


def _sampling(body, max_tokens, logprobs, params: frozenset[str],
              prompt_param: str) -> SamplingParams:
  top_k = _get(body, "top_k", int, "an int (0 or -1: no limit)")
  settings = dict(
      max_tokens=max_tokens,
      temperature=_get(body, "temperature", float, "a number", 1.0),
      top_k=None if top_k == -1 else top_k,  # vLLM's -1, as 0: no limit.
      top_p=_get(body, "top_p", float, "a number", 1.0),
      min_p=_get(body, "min_p", float, "a number", 0.0),
      stop_token_ids=_get(body, "stop_token_ids", list, "a list of token ids", []),
      seed=_get(body, "seed", int, "an int"),
      n=_get(body, "n", int, "an int", 1),
      logprobs=logprobs,
      ignore_eos=_get(body, "ignore_eos", bool, "a bool", False),
  )
  try:
    return SamplingParams(**settings)
  except (TypeError, ValueError) as e:
    raise _engine_error(e, params, prompt_param) from None


def _stream_settings(body) -> tuple[bool, bool]:
  stream = _get(body, "stream", bool, "a bool", False)
  options = _get(body, "stream_options", dict, "an object", None)
  if options is None:
    return stream, False
  if not stream:
    raise ApiError("stream_options is only allowed with stream: true", "stream_options")
  extra = sorted(set(options) - {"include_usage"})
  if extra:
    raise ApiError(f"stream_options.{extra[0]} is not supported (only include_usage)",
                   "stream_options")
  return stream, _get(options, "include_usage", bool, "a bool", False)


def _stops(body) -> tuple[str, ...]:
  stop = body.get("stop")
  stops = [stop] if isinstance(stop, str) else stop or []
  if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
    raise ApiError(f"stop should be a non-empty string or a list of them: but got {stop!r}", "stop")
  return tuple(stops)


def _completion_job(body, tokenizer: Tokenizer, model_name: str) -> _Job:
  _check_names(body, _COMPLETION_PARAMS, model_name)
  prompt = body.get("prompt")
  if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
    prompt = prompt[0]  # A batch of one.
  if isinstance(prompt, str):
    try:
      ids = tokenizer.encode(prompt)
    except ValueError as e:
      raise ApiError(str(e), "prompt") from None
  elif isinstance(prompt, list) and all(is_int(t) for t in prompt):
    ids = list(prompt)
  elif isinstance(prompt, list) and all(isinstance(p, (str, list)) for p in prompt):
    raise ApiError(
        f"prompt should be one prompt: but got a batch of {len(prompt)} (send one "
        f"request per prompt)", "prompt")
  else:
    raise ApiError(f"prompt should be a string or a list of token ids: but got {prompt!r:.80}",
                   "prompt")
  logprobs = _get(body, "logprobs", int, "an int")
  params = _sampling(body, _get(body, "max_tokens", int, "an int", 16), logprobs,
                     _COMPLETION_PARAMS, "prompt")
  return _Job(ids, params, _stops(body), *_stream_settings(body))


def _chat_messages(body) -> list[dict[str, str]]:
  messages = body.get("messages")
  if not isinstance(messages, list) or not messages:
    raise ApiError(f"messages should be a non-empty list: but got {messages!r:.80}", "messages")
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or m.get("role") not in _ROLES:
      role = m.get("role") if isinstance(m, dict) else m
      raise ApiError(
          f"messages[{i}].role should be one of {list(_ROLES)} (tools are not "
          f"supported): but got {role!r}", "messages")
    extra = sorted(
        k for k, v in m.items() if k not in ("role", "content", "name") and v not in (None, []))
    if extra:
      raise ApiError(f"messages[{i}].{extra[0]} is not supported", "messages")
    content = m.get("content")
    if isinstance(content, list):
      if not all(
          isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
          for p in content):
        raise ApiError(f"messages[{i}].content parts should all be text parts", "messages")
      content = "\n".join(p["text"] for p in content)
    if not isinstance(content, str):
      raise ApiError(f"messages[{i}].content should be a string: but got {content!r:.80}",
                     "messages")
    message = {"role": m["role"], "content": content}
    if m.get("name") is not None:
      message["name"] = str(m["name"])
    out.append(message)
  return out


def _chat_job(body, tokenizer: Tokenizer, template: ChatTemplate, model_name: str, max_len: int,
              max_logprobs: int) -> _Job:
  _check_names(body, _CHAT_PARAMS, model_name)
  messages = _chat_messages(body)
  try:
    text = template.render(messages)
  except Exception as e:  # The template's raise_exception, or any error of its Jinja.
    raise ApiError(f"the chat template refused the messages: {e}", "messages") from None
  try:
    ids = tokenizer.encode(text, add_special_tokens=template.add_special_tokens)
  except ValueError as e:
    raise ApiError(str(e), "messages") from None
  max_tokens = _get(body, "max_tokens", int, "an int")
  max_completion = _get(body, "max_completion_tokens", int, "an int")
  if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
    raise ApiError(
        "max_tokens and max_completion_tokens should agree when both are given: but "
        f"got {max_tokens} and {max_completion}", "max_completion_tokens")
  max_tokens = max_completion if max_tokens is None else max_tokens
  if max_tokens is None:
    max_tokens = max_len - len(ids)
    if max_tokens < 1:
      raise ApiError(
          f"the messages should take fewer than max_len={max_len} tokens: but they "
          f"take {len(ids)}", "messages")
  logprobs = _get(body, "logprobs", bool, "a bool", False)
  top = _get(body, "top_logprobs", int, "an int")
  if top is not None and not logprobs:
    raise ApiError("top_logprobs needs logprobs: true", "top_logprobs")
  if top is not None and not 0 <= top <= max_logprobs:
    raise ApiError(f"top_logprobs should be an int in [0, {max_logprobs}]: but got {top}",
                   "top_logprobs")
  engine_logprobs = (top or 0) if logprobs else None
  params = _sampling(body, max_tokens, engine_logprobs, _CHAT_PARAMS, "messages")
  return _Job(ids, params, _stops(body), *_stream_settings(body))


# Outputs. ------------------------------------------------------------------


class _Choice:
  """One output as its tokens arrive: ids, logprobs, text (cut at a stop string), reason."""
  def __init__(self, tokenizer: Tokenizer, context: list[int], stops: tuple[str, ...]):
    self.tokenizer = tokenizer
    self.context = context
    self.prefix = tokenizer.decode(context) if context else ""
    self.stops = stops
    self.token_ids: list[int] = []
    self.logprobs: list[Logprob] = []
    self.text = ""
    self.sent = 0  # Characters of text streamed.
    self.finish_reason: str | None = None

  def add(self, token_ids: Sequence[int], logprobs, finish_reason: str | None) -> None:
    if self.finish_reason is not None:  # Stopped at a stop string; the engine drew on.
      return
    self.token_ids.extend(token_ids)
    self.logprobs.extend(logprobs or ())
    if token_ids:
      self.text = self._decode()
      cuts = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
      if cuts:
        self.text = self.text[:min(cuts)]
        finish_reason = "stop"
    self.finish_reason = finish_reason

  def _decode(self) -> str:
    # Whole, and after some prompt tokens: pieces decoded apart can differ from the whole.
    whole = self.tokenizer.decode(self.context + self.token_ids)
    if whole.startswith(self.prefix):
      return whole[len(self.prefix):]
    return self.tokenizer.decode(self.token_ids)

  def take(self) -> str:
    """The text not streamed yet that no later token can change: all of it once finished."""
    end = len(self.text)
    if self.finish_reason is None:
      while end > self.sent and self.text[end - 1] == "\ufffd":  # An unfinished character.
        end -= 1
      held = max(
          (k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k], 0, end)),
          default=0)
      end -= held
    delta = self.text[self.sent:end] if end > self.sent else ""
    self.sent = max(self.sent, end)
    return delta


class _Generation:
  """A submitted request's n choices, filled from its stream."""
  def __init__(self, stream: RequestStream, job: _Job, tokenizer: Tokenizer):
    self.stream = stream
    self.job = job
    context = job.prompt_ids[-_CONTEXT_TOKENS:]
    self.choices = [_Choice(tokenizer, context, job.stops) for _ in range(job.params.n)]

  @property
  def done(self) -> bool:
    return all(c.finish_reason is not None for c in self.choices)

  async def next(self) -> tuple[int, int] | None:
    """Waits for the next output; returns (its choice, how many logprobs it had before).

    None once every choice has finished; then the request is cancelled if
    the engine still draws for it (a stop string ended its choices).
    """
    if self.done:
      self.stream.close()
      return None
    out = await anext(self.stream, None)
    if out is None:
      raise RuntimeError(f"request {self.stream.request_id} ended before its outputs finished")
    choice = self.choices[out.index]
    before = len(choice.logprobs)
    choice.add(out.token_ids, out.logprobs, out.finish_reason if out.finished else None)
    if choice.finish_reason is not None and not out.finished:
      self.stream.cancel(out.index)  # A stop string: free its slot, the others go on.
    return out.index, before

  def usage(self) -> dict[str, int]:
    prompt, completion = len(self.job.prompt_ids), sum(len(c.token_ids) for c in self.choices)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion
    }


def _finite(x: float) -> float:
  return x if math.isfinite(x) else _FLOOR


def _legacy_logprobs(tokenizer: Tokenizer, logprobs: Sequence[Logprob], offset: int):
  """The completions API's logprobs of some tokens; offsets count from `offset`."""
  out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
  for lp in logprobs:
    text = tokenizer.decode([lp.token])
    top = {tokenizer.decode([t]): _finite(v) for t, v in lp.top}
    top.setdefault(text, _finite(lp.logprob))  # As OpenAI: the drawn token is always there.
    out["tokens"].append(text)
    out["token_logprobs"].append(_finite(lp.logprob))
    out["top_logprobs"].append(top)
    out["text_offset"].append(offset)
    offset += len(text)
  return out


def _chat_logprobs(tokenizer: Tokenizer, logprobs: Sequence[Logprob]):
  """The chat API's logprobs of some tokens: {"content": [{token, logprob, bytes, top}]}."""
  def entry(token, value):
    text = tokenizer.decode([token])
    return {"token": text, "logprob": _finite(value), "bytes": list(text.encode())}

  return {
      "content": [
          dict(entry(lp.token, lp.logprob), top_logprobs=[entry(t, v) for t, v in lp.top])
          for lp in logprobs
      ]
  }


# The app. ------------------------------------------------------------------


class _EventStream(responses.StreamingResponse):
  """Server-sent events whose generator is closed however the response ends.

  Starlette stops reading a disconnected client's stream without closing
  it; closing it here runs its `finally`, which cancels the request at once
  rather than when the generator is collected.
  """
  def __init__(self, content):
    super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

  async def __call__(self, scope, receive, send):
    try:
      await super().__call__(scope, receive, send)
    finally:
      await self.body_iterator.aclose()


def _event(data: Any) -> str:
  return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _server_error(error: Exception, status: int = 500) -> ApiError:
  return ApiError(str(error), None, status, None, "server_error")


async def _unless_disconnected(request: fastapi.Request, work):
  """Awaits `work`; cancels it if the client disconnects first (its `finally` cancels the request).

  A non-streaming reply is sent whole at the end, so a client that gave up
  would otherwise hold its slots and pages until the request finished.
  """
  async def disconnected():
    while (await request.receive())["type"] != "http.disconnect":
      pass

  task, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
  try:
    await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
  finally:
    watch.cancel()
    task.cancel()  # Nothing if it is done; a cancelled request's `finally` cancels it.
  if not task.done() or task.cancelled():
    raise ApiError("the client disconnected", None, 499, None, "server_error")
  return task.result()


class _Server:
  """The routes' work: a request's body in, its reply (a dict or an event stream) out."""
  def __init__(self, async_engine: AsyncEngine, tokenizer: Tokenizer, model_name: str,
               chat_template: ChatTemplate):
    self.async_engine = async_engine
    self.tokenizer = tokenizer
    self.model_name = model_name
    self.chat_template = chat_template
    self.max_len = async_engine.engine.max_len
    self.max_logprobs = async_engine.engine.engine_config.max_logprobs

  def submit(self, job: _Job, request_id: str, params: frozenset[str],
             prompt_param: str) -> _Generation:
    try:
      stream = self.async_engine.submit(job.prompt_ids, job.params, request_id)
    except (TypeError, ValueError) as e:
      raise _engine_error(e, params, prompt_param) from None
    except RuntimeError as e:  # The step thread is not running.
      raise _server_error(e, 503) from None
    return _Generation(stream, job, self.tokenizer)

  @staticmethod
  async def run(generation: _Generation) -> None:
    try:
      while await generation.next() is not None:
        pass
    except RuntimeError as e:  # The step thread failed.
      raise _server_error(e) from None
    finally:
      generation.stream.close()

  @staticmethod
  def event_stream(generation: _Generation, head: dict[str, Any], chunks) -> _EventStream:
    """`data: {chunk}` events, a usage chunk if asked for, then `data: [DONE]`."""
    async def events():
      try:
        async for chunk in chunks:
          yield _event(chunk)
        if generation.job.include_usage:
          yield _event(dict(head, choices=[], usage=generation.usage()))
      except RuntimeError as e:  # The step thread failed: too late for a status code.
        yield _event(_server_error(e).body())
      finally:
        generation.stream.close()  # At once when the client goes away (see _EventStream).
      yield "data: [DONE]\n\n"

    return _EventStream(events())

  def models(self) -> dict[str, Any]:
    model = dict(id=self.model_name, object="model", created=int(time.time()), owned_by="kvattn",
                 max_model_len=self.max_len)
    return dict(object="list", data=[model])

  async def completions(self, body: Any, request: fastapi.Request):
    job = _completion_job(body, self.tokenizer, self.model_name)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    generation = self.submit(job, request_id, _COMPLETION_PARAMS, "prompt")
    head = dict(id=request_id, object="text_completion", created=int(time.time()),
                model=self.model_name)
    offsets = [0] * job.params.n  # Where each choice's next token's text starts.

    def logprobs_of(i: int, before: int):
      if job.params.logprobs is None:
        return None
      out = _legacy_logprobs(self.tokenizer, generation.choices[i].logprobs[before:], offsets[i])
      offsets[i] += sum(len(t) for t in out["tokens"])
      return out

    if not job.stream:
      await _unless_disconnected(request, self.run(generation))
      choices = [
          dict(index=i, text=c.text, logprobs=logprobs_of(i, 0), finish_reason=c.finish_reason)
          for i, c in enumerate(generation.choices)
      ]
      return dict(head, choices=choices, usage=generation.usage())

    async def chunks():
      while (event := await generation.next()) is not None:
        i, before = event
        c = generation.choices[i]
        text, logprobs = c.take(), logprobs_of(i, before)
        if text or logprobs or c.finish_reason is not None:
          choice = dict(index=i, text=text, logprobs=logprobs, finish_reason=c.finish_reason)
          yield dict(head, choices=[choice], usage=None)

    return self.event_stream(generation, head, chunks())

  async def chat(self, body: Any, request: fastapi.Request):
    job = _chat_job(body, self.tokenizer, self.chat_template, self.model_name, self.max_len,
                    self.max_logprobs)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    generation = self.submit(job, request_id, _CHAT_PARAMS, "messages")
    head = dict(id=request_id, object="chat.completion", created=int(time.time()),
                model=self.model_name)

    def logprobs_of(i: int, before: int):
      if job.params.logprobs is None:
        return None
      return _chat_logprobs(self.tokenizer, generation.choices[i].logprobs[before:])

    if not job.stream:
      await _unless_disconnected(request, self.run(generation))
      choices = [
          dict(index=i, message=dict(role="assistant", content=c.text), logprobs=logprobs_of(i, 0),
               finish_reason=c.finish_reason) for i, c in enumerate(generation.choices)
      ]
      return dict(head, choices=choices, usage=generation.usage())

    head["object"] = "chat.completion.chunk"

    async def chunks():
      for i in range(job.params.n):
        delta = dict(role="assistant", content="")
        choice = dict(index=i, delta=delta, logprobs=None, finish_reason=None)
        yield dict(head, choices=[choice], usage=None)
      while (event := await generation.next()) is not None:
        i, before = event
        c = generation.choices[i]
        text, logprobs = c.take(), logprobs_of(i, before)
        if text or (logprobs and logprobs["content"]) or c.finish_reason is not None:
          delta = dict(content=text) if text else {}
          choice = dict(index=i, delta=delta, logprobs=logprobs, finish_reason=c.finish_reason)
          yield dict(head, choices=[choice], usage=None)

    return self.event_stream(generation, head, chunks())


def build_app(async_engine: AsyncEngine, tokenizer: Tokenizer, model_name: str,
              chat_template: str | ChatTemplate | None = None) -> fastapi.FastAPI:
  """The OpenAI-compatible app over `async_engine` (which the caller starts and stops).

  Args:
    async_engine: the engine's loop (`AsyncEngine`).
    tokenizer: text <-> ids for the engine's model (`CharTokenizer`,
      `HFTokenizer`, or anything with their `encode` and `decode`).
    model_name: the model's id: requests must name it.
    chat_template: a `ChatTemplate`, Jinja source, or None (`FALLBACK`).
  """
  if not isinstance(async_engine, AsyncEngine):
    raise TypeError(f"async_engine should be an AsyncEngine: but got "
                    f"{type(async_engine).__name__}")
  if not (callable(getattr(tokenizer, "encode", None))
          and callable(getattr(tokenizer, "decode", None))):
    raise TypeError(f"tokenizer should have encode(text) and decode(ids): but got "
                    f"{type(tokenizer).__name__}")
  if not isinstance(model_name, str) or not model_name:
    raise ValueError(f"model_name should be a non-empty str: but got {model_name!r}")
  if chat_template is None or isinstance(chat_template, str):
    chat_template = FALLBACK if chat_template is None else ChatTemplate(chat_template)
  elif not isinstance(chat_template, ChatTemplate):
    raise TypeError(f"chat_template should be a ChatTemplate, a str or None: but got "
                    f"{type(chat_template).__name__}")
  server = _Server(async_engine, tokenizer, model_name, chat_template)
  app = fastapi.FastAPI(title=f"kvattn: {model_name}")

  @app.exception_handler(ApiError)
  async def _refuse(request, error: ApiError):
    del request
    return responses.JSONResponse(error.body(), status_code=error.status)

  async def body_of(request: fastapi.Request) -> Any:
    try:
      return json.loads(await request.body())
    except ValueError as e:
      raise ApiError(f"the request body should be JSON: {e}") from None

  @app.get("/health")
  def health():
    if async_engine.running:
      return {"status": "ok"}
    error = async_engine.error
    body = dict(status="stopped" if error is None else "failed",
                error=None if error is None else repr(error))
    return responses.JSONResponse(body, status_code=503)

  @app.get("/metrics")
  def metrics():  # A plain def: FastAPI runs it in a worker thread, as it may wait for a step.
    return async_engine.metrics()

  @app.get("/v1/models")
  async def models():
    return server.models()

  @app.post("/v1/completions")
  async def completions(request: fastapi.Request):
    return await server.completions(await body_of(request), request)

  @app.post("/v1/chat/completions")
  async def chat_completions(request: fastapi.Request):
    return await server.chat(await body_of(request), request)

  return app
