"""Tests of kvattn/serving/async_engine.py and kvattn/serving/openai_api.py (and examples/serve.py).

The app runs in this process: uvicorn serves it from a thread on a free
port of 127.0.0.1, the bundled char-level model behind it, and the real
`openai` client talks to it. Greedy outputs are compared with the tokens the
same engine gives each prompt alone (`Engine.generate`, before the loop
starts). Every wait is bounded.
"""

import asyncio
import concurrent.futures
import contextlib
import json
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
pytest.importorskip("jinja2")

from kvattn import serving  # noqa: E402  (after the skips: the serve extra may be missing)
from kvattn.models import charlm  # noqa: E402
from kvattn.serving import async_engine as async_engine_lib  # noqa: E402
from kvattn.serving import openai_api  # noqa: E402
from kvattn.serving import text  # noqa: E402

REPO = pathlib.Path(__file__).absolute().parent.parent
MODEL = "charlm"
ENGINE_CONFIG = serving.EngineConfig(max_seqs=4, max_len=128, page_size=8, token_budget=32)
PROMPTS = ("def parse(", "import ", "class Stack:\n    def push(self, item):\n        ",
           "for i in range(10):\n    ")
CHAT = [{
    "role": "system",
    "content": "You write Python."
}, {
    "role": "user",
    "content": "def f(x):"
}]
N = 40  # Tokens per greedy request.
TIMEOUT_S = 30


def wait_for(condition, timeout_s=TIMEOUT_S, what="the condition"):
  deadline = time.monotonic() + timeout_s
  while not condition():
    if time.monotonic() > deadline:
      raise TimeoutError(f"{what} did not hold within {timeout_s} s")
    time.sleep(0.01)


@pytest.fixture(scope="module")
def model():
  return charlm.load()


@pytest.fixture(scope="module")
def engine(model):
  params, config, _ = model
  return serving.Engine(params, config, ENGINE_CONFIG)


@pytest.fixture(scope="module")
def reference(model, engine):
  """Greedy tokens (and logprobs) of each prompt alone, and of the chat prompt, from the engine."""
  vocab = model[2]
  params = serving.SamplingParams(max_tokens=N, temperature=0, logprobs=3)
  chat_prompt = text.FALLBACK.render(CHAT)
  out = {}
  for prompt in PROMPTS + (chat_prompt,):
    (completion,) = engine.generate([vocab.encode(prompt)], params)
    out[prompt] = completion
  out["chat"] = out.pop(chat_prompt)
  engine.pool.check_idle()
  return out


@pytest.fixture(scope="module")
def async_engine(engine, reference):
  del reference  # Computed first: Engine.generate steps the engine itself.
  with async_engine_lib.AsyncEngine(engine) as running:
    yield running


@pytest.fixture(scope="module")
def server(model, async_engine):
  """The app served from a thread; yields its base URL."""
  app = openai_api.build_app(async_engine, text.CharTokenizer(model[2]), MODEL)
  sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  sock.bind(("127.0.0.1", 0))
  server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
  thread = threading.Thread(target=server.run, kwargs=dict(sockets=[sock]), daemon=True)
  thread.start()
  wait_for(lambda: server.started or not thread.is_alive(), what="the server's start")
  assert thread.is_alive(), "the server thread ended at start-up"
  yield f"http://127.0.0.1:{sock.getsockname()[1]}"
  server.should_exit = True
  thread.join(TIMEOUT_S)
  sock.close()
  assert not thread.is_alive(), "the server did not stop"


@pytest.fixture
def client(server):
  with openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0,
                     timeout=TIMEOUT_S) as c:
    yield c


@pytest.fixture
def slow_steps(engine, monkeypatch):
  """Each step takes at least 5 ms, so that a request of ~100 tokens outlives a quick cancel."""
  step = engine.step

  def slow_step():
    time.sleep(0.005)
    return step()

  monkeypatch.setattr(engine, "step", slow_step)


def assert_idle(engine):
  """The engine's queue drains and every page returns, within a bounded wait."""
  wait_for(lambda: engine.pool.in_use == 0 and not engine.has_work(), what="the engine's drain")
  engine.pool.check_idle()


def text_of(model, completion, index=0):
  return model[2].decode(completion.token_ids[index])


def tiny_engine(model, step):
  """An engine that compiles nothing (no warmup) and whose step is `step`."""
  params, config, _ = model
  small = serving.EngineConfig(max_seqs=1, max_len=16, page_size=8, token_budget=8)
  engine = serving.Engine(params, config, small, warmup=False)
  engine.step = step
  return engine


# AsyncEngine, without HTTP. --------------------------------------------------


def test_stream_gives_the_tokens_of_the_engine_alone(model, async_engine, reference):
  prompt = PROMPTS[0]

  async def collect():
    params = serving.SamplingParams(max_tokens=N, temperature=0)
    return [out async for out in async_engine.stream(model[2].encode(prompt), params)]

  outs = asyncio.run(asyncio.wait_for(collect(), TIMEOUT_S))
  assert [t for out in outs for t in out.token_ids] == reference[prompt].token_ids[0]
  assert [out.finished for out in outs] == [False] * (N - 1) + [True]
  assert outs[-1].finish_reason == "length"
  assert_idle(async_engine.engine)


def test_stream_of_n_outputs_ends_after_the_last(model, async_engine):
  async def collect():
    params = serving.SamplingParams(max_tokens=5, temperature=0.8, n=3, seed=7)
    return [out async for out in async_engine.stream(model[2].encode("x = "), params, "n3")]

  outs = asyncio.run(asyncio.wait_for(collect(), TIMEOUT_S))
  assert {out.request_id for out in outs} == {"n3"}
  for index in range(3):
    mine = [out for out in outs if out.index == index]
    assert len(mine) == 5 and mine[-1].finished and not any(o.finished for o in mine[:-1])


def test_cancelling_one_output_lets_the_others_finish(model, async_engine, slow_steps):
  del slow_steps

  async def collect():
    params = serving.SamplingParams(max_tokens=30, temperature=0.8, n=2, seed=3)
    stream = async_engine.submit(model[2].encode("x = "), params)
    outs = []
    async for out in stream:
      outs.append(out)
      if out.index == 0 and len(outs) == 3:
        stream.cancel(0)
    return outs

  outs = asyncio.run(asyncio.wait_for(collect(), TIMEOUT_S))
  first = [o for o in outs if o.index == 0]
  second = [o for o in outs if o.index == 1]
  assert first[-1].finish_reason == "abort" and len(first) < 30
  assert second[-1].finish_reason == "length" and len(second) == 30
  assert_idle(async_engine.engine)


def test_bad_requests_raise_in_the_caller(model, async_engine):
  async def submit(prompt, params):
    return async_engine.submit(prompt, params)

  async def first(prompt, params):
    return await anext(async_engine.stream(prompt, params))

  ids = model[2].encode("def ")
  for call in (submit, first):
    with pytest.raises(ValueError, match="temperature"):
      asyncio.run(call(ids, serving.SamplingParams(temperature=-1.0)))
    with pytest.raises(ValueError, match="non-empty"):
      asyncio.run(call([], serving.SamplingParams()))
    with pytest.raises(TypeError, match="SamplingParams"):
      asyncio.run(call(ids, {"max_tokens": 3}))
  assert async_engine.running and not async_engine.engine.has_work()


def test_closing_a_stream_early_cancels_its_request(model, async_engine, slow_steps):
  del slow_steps
  before = async_engine.metrics()["requests_aborted"]

  async def read_two():
    params = serving.SamplingParams(max_tokens=100, temperature=0)
    stream = async_engine.stream(model[2].encode("import "), params)
    outs = [await anext(stream), await anext(stream)]
    await stream.aclose()
    return outs

  outs = asyncio.run(asyncio.wait_for(read_two(), TIMEOUT_S))
  assert not any(out.finished for out in outs)
  assert_idle(async_engine.engine)
  assert async_engine.metrics()["requests_aborted"] == before + 1


def test_cancelling_the_reading_task_cancels_its_request(model, async_engine, slow_steps):
  del slow_steps
  before = async_engine.metrics()["requests_aborted"]

  async def cancel_after_a_token():
    got = asyncio.Event()

    async def consume():
      params = serving.SamplingParams(max_tokens=100, temperature=0)
      async for _ in async_engine.stream(model[2].encode("import "), params):
        got.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got.wait(), TIMEOUT_S)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
      await task

  asyncio.run(cancel_after_a_token())
  assert_idle(async_engine.engine)
  assert async_engine.metrics()["requests_aborted"] == before + 1


def test_an_error_in_the_step_thread_reaches_the_waiting_caller(model):
  def failing_step():
    raise FloatingPointError("boom")

  failing = async_engine_lib.AsyncEngine(tiny_engine(model, failing_step))

  async def read():
    return [out async for out in failing.stream([1, 2, 3], serving.SamplingParams(max_tokens=2))]

  with failing:
    with pytest.raises(RuntimeError, match="step failed") as caught:
      asyncio.run(asyncio.wait_for(read(), TIMEOUT_S))
    assert isinstance(caught.value.__cause__, FloatingPointError)
    wait_for(lambda: not failing.running, what="the step thread's end")
    assert isinstance(failing.error, FloatingPointError)
    with pytest.raises(RuntimeError, match="step thread failed"):
      asyncio.run(read())


def test_stop_ends_waiting_streams_and_the_idle_loop_sleeps(model):
  steps = []

  def step():  # Work that never finishes: the stream waits until stop().
    steps.append(time.monotonic())
    time.sleep(0.002)
    return []

  looping = async_engine_lib.AsyncEngine(tiny_engine(model, step)).start()
  time.sleep(0.1)
  assert not steps, "the loop stepped without work"

  async def read_then_stop():
    stream = looping.submit([1, 2, 3], serving.SamplingParams(max_tokens=2))
    wait = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.05)
    await asyncio.get_running_loop().run_in_executor(None, looping.stop)
    return await asyncio.wait_for(wait, TIMEOUT_S)

  with pytest.raises(RuntimeError, match="stopped before request"):
    asyncio.run(read_then_stop())
  assert steps and not looping.running and looping.error is None
  with pytest.raises(RuntimeError, match="not running"):
    asyncio.run(read_then_stop())


# The HTTP app. ---------------------------------------------------------------


def test_models_health_and_metrics(client, server):
  (listed,) = client.models.list().data
  assert listed.id == MODEL and listed.owned_by == "kvattn"
  with urllib.request.urlopen(f"{server}/health", timeout=TIMEOUT_S) as response:
    assert json.load(response) == {"status": "ok"}
  with urllib.request.urlopen(f"{server}/metrics", timeout=TIMEOUT_S) as response:
    metrics = json.load(response)
  assert {"requests", "tokens_generated", "pages_in_use", "ttft_p50_s"} <= set(metrics)


def test_greedy_completion_is_the_engines_alone(client, model, reference):
  for prompt in PROMPTS[:2]:
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=N, temperature=0)
    (choice,) = out.choices
    assert choice.text == text_of(model, reference[prompt])
    assert choice.finish_reason == "length"
    assert out.usage.prompt_tokens == len(prompt) and out.usage.completion_tokens == N
  ids = model[2].encode(PROMPTS[0]).tolist()
  by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=N, temperature=0)
  assert by_ids.choices[0].text == text_of(model, reference[PROMPTS[0]])


def test_streamed_completion_concatenates_to_the_whole(client, model, reference):
  prompt = PROMPTS[2]
  chunks = list(
      client.completions.create(model=MODEL, prompt=prompt, max_tokens=N, temperature=0,
                                stream=True, stream_options={"include_usage": True}))
  texts = [c.choices[0].text for c in chunks if c.choices]
  assert len(texts) == N and "".join(texts) == text_of(model, reference[prompt])
  assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
  assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == N


def test_chat_completion_streamed_and_whole(client, model, reference):
  expected = text_of(model, reference["chat"])
  whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=N, temperature=0)
  assert whole.choices[0].message.role == "assistant"
  assert whole.choices[0].message.content == expected
  assert whole.usage.prompt_tokens == len(text.FALLBACK.render(CHAT))
  chunks = list(
      client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=N, temperature=0,
                                     stream=True))
  assert chunks[0].choices[0].delta.role == "assistant"
  assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
  assert chunks[-1].choices[0].finish_reason == "length"


def test_concurrent_clients_each_get_their_greedy_text(client, model, reference):
  def ask(prompt):
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=N, temperature=0)
    return prompt, out.choices[0].text

  jobs = [PROMPTS[i % len(PROMPTS)] for i in range(8)]  # Twice the engine's slots.
  with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
    answers = list(pool.map(ask, jobs, timeout=TIMEOUT_S))
  for prompt, answer in answers:
    assert answer == text_of(model, reference[prompt]), prompt


def test_completion_logprobs_are_the_engines(client, model, reference):
  prompt = PROMPTS[1]
  out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=N, temperature=0,
                                  logprobs=3)
  lp = out.choices[0].logprobs
  expected = reference[prompt].logprobs[0]
  assert "".join(lp.tokens) == out.choices[0].text and len(lp.tokens) == N
  assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(N)]
  assert lp.token_logprobs == pytest.approx([e.logprob for e in expected], abs=1e-5)
  for top, token, e in zip(lp.top_logprobs, lp.tokens, expected):
    assert len(top) in (3, 4) and token in top  # The drawn token is always listed.
    assert max(top.values()) == pytest.approx(e.top[0][1], abs=1e-5)


def test_chat_logprobs_are_shaped_as_openais(client):
  out = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, temperature=0,
                                       logprobs=True, top_logprobs=2)
  content = out.choices[0].logprobs.content
  assert "".join(c.token for c in content) == out.choices[0].message.content
  assert len(content) == 10
  for c in content:
    assert c.logprob <= 0 and len(c.top_logprobs) == 2 and c.bytes == list(c.token.encode())
    assert c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob


def test_stop_strings_cut_the_text_and_end_the_request(client, model, reference, async_engine):
  prompt = PROMPTS[0]
  full = text_of(model, reference[prompt])
  stop = ["\n", "):"]
  cut = min(full.find(s) for s in stop if s in full)
  assert 0 < cut < N - 4, "the reference should hit a stop string early"
  out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=N, temperature=0,
                                  stop=stop)
  assert out.choices[0].text == full[:cut] and out.choices[0].finish_reason == "stop"
  assert out.usage.completion_tokens < N
  streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=N, temperature=0,
                                       stop=stop, stream=True)
  assert "".join(c.choices[0].text for c in streamed) == full[:cut]
  assert_idle(async_engine.engine)


def test_seeded_samples_repeat(client):
  def ask():
    out = client.completions.create(model=MODEL, prompt="def ", max_tokens=12, temperature=0.9,
                                    top_p=0.95, n=2, seed=123, extra_body={"top_k": 20})
    return [c.text for c in out.choices]

  first = ask()
  assert len(first) == 2 and ask() == first


@pytest.mark.parametrize("settings, param", [
    (dict(max_tokens=1000), "max_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(presence_penalty=0.5), "presence_penalty"),
    (dict(frequency_penalty=1.0), "frequency_penalty"),
    (dict(n=ENGINE_CONFIG.max_seqs + 1), "n"),
    (dict(prompt=""), "prompt"),
    (dict(prompt=["def ", "import "]), "prompt"),
    (dict(prompt="caf\u00e9"), "prompt"),
    (dict(best_of=2), "best_of"),
    (dict(echo=True), "echo"),
    (dict(suffix="x"), "suffix"),
    (dict(logit_bias={"5": 10}), "logit_bias"),
    (dict(logprobs=ENGINE_CONFIG.max_logprobs + 1), "logprobs"),
    (dict(stop=[""]), "stop"),
    (dict(extra_body={"mirostat": 1}), "mirostat"),
])
def test_bad_completion_requests_get_400_and_the_server_goes_on(client, settings, param):
  request = dict(model=MODEL, prompt="def ", max_tokens=4) | settings
  with pytest.raises(openai.BadRequestError) as caught:
    client.completions.create(**request)
  assert caught.value.status_code == 400 and caught.value.param == param
  assert caught.value.body["type"] == "invalid_request_error" and caught.value.body["message"]
  assert client.completions.create(model=MODEL, prompt="def ", max_tokens=4).choices[0].text


@pytest.mark.parametrize("settings, param", [
    (dict(tools=[{
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {}
        }
    }]), "tools"),
    (dict(top_logprobs=2), "top_logprobs"),
    (dict(response_format={"type": "json_object"}), "response_format"),
    (dict(messages=[{
        "role": "tool",
        "content": "1",
        "tool_call_id": "a"
    }]), "messages"),
    (dict(messages=[]), "messages"),
    (dict(max_tokens=5, extra_body={"max_completion_tokens": 6}), "max_completion_tokens"),
])
def test_bad_chat_requests_get_400(client, settings, param):
  request = dict(model=MODEL, messages=CHAT, max_tokens=4) | settings
  with pytest.raises(openai.BadRequestError) as caught:
    client.chat.completions.create(**request)
  assert caught.value.param == param


def test_an_unknown_model_is_404(client):
  with pytest.raises(openai.NotFoundError) as caught:
    client.completions.create(model="gpt-4", prompt="def ", max_tokens=4)
  assert caught.value.code == "model_not_found"


def test_a_client_that_disconnects_cancels_its_stream(client, async_engine, slow_steps):
  del slow_steps
  before = async_engine.metrics()["requests_aborted"]
  stream = client.completions.create(model=MODEL, prompt="import ", max_tokens=100, temperature=0,
                                     stream=True)
  for _, _ in zip(range(3), stream):
    pass
  stream.close()
  assert_idle(async_engine.engine)
  assert async_engine.metrics()["requests_aborted"] == before + 1
  assert client.completions.create(model=MODEL, prompt="def ", max_tokens=4).choices[0].text


def test_a_client_that_disconnects_cancels_its_whole_reply(server, async_engine, slow_steps):
  del slow_steps
  before = async_engine.metrics()["requests_aborted"]
  body = json.dumps(dict(model=MODEL, prompt="import ", max_tokens=100)).encode()
  host, port = server.removeprefix("http://").split(":")
  with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as conn:
    conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    wait_for(lambda: async_engine.engine.pool.in_use > 0, what="the request's start")
  assert_idle(async_engine.engine)
  assert async_engine.metrics()["requests_aborted"] == before + 1


def test_char_tokenizer_and_the_fallback_template(model):
  tokenizer = text.CharTokenizer(model[2])
  assert tokenizer.decode(tokenizer.encode("def f(x):\n")) == "def f(x):\n"
  with pytest.raises(ValueError, match="'é'"):
    tokenizer.encode("café")
  messages = [{
      "role": "user",
      "content": "hi",
      "name": "ann"
  }, {
      "role": "assistant",
      "content": "ok"
  }]
  assert text.FALLBACK.render(messages) == "user (ann): hi\nassistant: ok\nassistant: "


def test_hf_tokenizer_and_a_checkpoints_chat_template(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  vocab = {"<s>": 0, "<unk>": 1, "hello": 2, "world": 3}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.decoder = tokenizers.decoders.WordPiece()
  tok.add_special_tokens(["<s>"])
  hf = text.HFTokenizer(tok)
  assert hf.encode("hello world") == [2, 3] and hf.decode([0, 2, 3]) == "hello world"
  template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}"
              "{{ raise_exception('no tools') }}{% endif %}<{{ m['role'] }}>{{ m['content'] }}\n"
              "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
  config = {
      "bos_token": {
          "content": "<s>"
      },
      "chat_template": [{
          "name": "default",
          "template": template
      }]
  }
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
  chat = text.ChatTemplate.from_checkpoint(tmp_path)
  assert not chat.add_special_tokens
  assert chat.render([{"role": "user", "content": "hi"}]) == "<s><user>hi\n<assistant>"
  with pytest.raises(ValueError, match="no tools"):
    chat.render([{"role": "tool", "content": "1"}])
  (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
  assert text.ChatTemplate.from_checkpoint(tmp_path).render([{
      "role": "user",
      "content": "x"
  }]) == "x"
  assert text.ChatTemplate.from_checkpoint(tmp_path / "none") is None


def test_streamed_text_holds_back_a_possible_stop_string(model):
  tokenizer = text.CharTokenizer(model[2])
  choice = openai_api._Choice(tokenizer, tokenizer.encode("x"), ("ab", "zzz"))
  sent = []
  for char in "xyazabc":
    choice.add(tokenizer.encode(char), None, None)
    sent.append(choice.take())
    if choice.finish_reason:
      break
  # An "a" waits for the next character (it may start "ab"), a "z" too (it may start "zzz");
  # "ab" ends the output before it.
  assert sent == ["x", "y", "", "a", "z", ""] and choice.text == "xyaz"
  assert choice.finish_reason == "stop" and len(choice.token_ids) == 6


def test_streamed_text_holds_back_an_unfinished_character():
  class Bytes:  # One token per UTF-8 byte, as a byte-level tokenizer may split a character.
    def encode(self, text, add_special_tokens=True):
      return list(text.encode())

    def decode(self, ids):
      return bytes(ids).decode("utf-8", errors="replace")

  choice = openai_api._Choice(Bytes(), [], ())
  sent = []
  for token in "a\u00e9".encode():
    choice.add([token], None, None)
    sent.append(choice.take())
  assert sent == ["a", "", "\u00e9"]


def test_the_example_refuses_bad_flags():
  run = subprocess.run([sys.executable, "examples/serve.py", "--max_seqs=0"], cwd=REPO,
                       capture_output=True, text=True, timeout=120, check=False)
  assert run.returncode != 0 and "--max_seqs should be a positive int" in run.stderr, run.stderr


@pytest.mark.slow
def test_the_example_serves_the_bundled_model(tmp_path):
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  flags = [f"--port={port}", "--max_seqs=2", "--max_len=64", "--page_size=8", "--token_budget=16"]
  url = f"http://127.0.0.1:{port}"
  log = tmp_path / "serve.log"
  with open(log, "w") as out, subprocess.Popen([sys.executable, "examples/serve.py", *flags],
                                               cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                               text=True) as process:

    def healthy():
      assert process.poll() is None, log.read_text()
      try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
          return response.status == 200
      except OSError:
        return False

    try:
      wait_for(healthy, timeout_s=180, what="the example's start")
      body = json.dumps(dict(model=MODEL, prompt="def ", max_tokens=8, temperature=0)).encode()
      request = urllib.request.Request(f"{url}/v1/completions", body,
                                       {"Content-Type": "application/json"})
      with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        answer = json.load(response)
      assert answer["usage"]["completion_tokens"] == 8 and len(answer["choices"][0]["text"]) == 8
    finally:
      process.send_signal(signal.SIGINT)
      try:
        process.wait(TIMEOUT_S)
      except subprocess.TimeoutExpired:
        process.kill()
        process.wait(TIMEOUT_S)
