"""No test escapes Bazel: BUILD runs every tests/*_test.py under pytest.

A py_test runs its `main` file as a script, and a test file run as a script
defines its tests and PASSES WITHOUT RUNNING ANY. So BUILD gives each test file
a `kvattn_py_test` (build_defs.bzl): a py_test whose main is
tests/pytest_main.py, which runs pytest on the file. These tests check that
every test file has one, with a size; that the macro still wires the runner
and the runner fails when it should; that every module and example has a
target, so that `bazel build //...` builds the whole tree; and that deps are
what the sources import.

BUILD and .bzl files are Starlark, whose syntax is a subset of Python's: `ast`
parses BUILD, and build_defs.bzl runs as Python with recording stand-ins for
the rules it loads, so a macro call expands here as Bazel expands it.
"""

import ast
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

# Not resolve(): under Bazel this file is a symlink in the runfiles tree, and
# BUILD plus the files it checks are data next to it there.
ROOT = pathlib.Path(__file__).absolute().parent.parent

MACRO = "kvattn_py_test"
BZL = "build_defs.bzl"
RUNNER = "tests/pytest_main.py"
_RULES = ("py_binary", "py_library", "py_test", MACRO)


def _literal(node: ast.expr):
  """A string or list-of-strings attribute; None for globs and other expressions."""
  try:
    return ast.literal_eval(node)
  except ValueError:
    return None


def load_bzl(root: pathlib.Path) -> dict:
  """build_defs.bzl's globals; the rules it loads record their calls in ["_calls"]."""
  calls = []

  def load(label, *symbols, **aliases):
    del label
    for local, rule in [(s, s) for s in symbols] + list(aliases.items()):
      namespace[local] = lambda rule=rule, **attrs: calls.append({"rule": rule, **attrs})

  def fail(msg, *args):
    raise ValueError(" ".join(str(m) for m in (msg,) + args))

  namespace = {"load": load, "fail": fail, "_calls": calls}
  exec(compile((root / BZL).read_text(encoding="utf-8"), BZL, "exec"), namespace)
  return namespace


def expand_macro(bzl: dict, **attrs) -> list[dict]:
  """The rule calls that `kvattn_py_test(**attrs)` makes."""
  calls = bzl["_calls"]
  del calls[:]
  bzl[MACRO](**attrs)
  return list(calls)


def parse_targets(build_text: str, root: pathlib.Path) -> list[dict]:
  """The targets in a BUILD file: rule, name, srcs, deps, data, main, size, macro.

  A kvattn_py_test call gives the py_test it expands to, with macro=True.
  """
  targets, bzl = [], None
  for node in ast.walk(ast.parse(build_text, filename="BUILD")):
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id in _RULES):
      continue
    attrs = {kw.arg: _literal(kw.value) for kw in node.keywords if kw.arg}
    macro = node.func.id == MACRO
    if macro:  # A size left out stays None here, for bazel_test_problems to report.
      bzl = bzl or load_bzl(root)
      [attrs] = expand_macro(
          bzl, **{
              "size": None,
              **{
                  k: v if v is not None or k == "size" else [] for k, v in attrs.items()
              }
          })
    lists = {
        key: list(attrs[key]) if isinstance(attrs.get(key), list) else []
        for key in ("srcs", "deps", "data")
    }
    targets.append({
        "rule": attrs.get("rule", node.func.id),
        "name": attrs.get("name"),
        "main": attrs.get("main"),
        "size": attrs.get("size"),
        "macro": macro,
        **lists
    })
  return targets


def bazel_test_problems(root: pathlib.Path, build_text: str) -> list[str]:
  """Test files without a sized kvattn_py_test, run as a script, or targets without a file."""
  targets = parse_targets(build_text, root)
  by_name = {t["name"]: t for t in targets if t["macro"]}
  problems = []
  for path in sorted(root.glob("tests/*_test.py")):
    rel = path.relative_to(root).as_posix()
    target = by_name.pop(path.stem, None)
    if target is None:
      problems.append(f'{rel}: no {MACRO}(name = "{path.stem}", ...) in BUILD')
    elif target["size"] is None:
      problems.append(f"{rel}: {MACRO} {path.stem!r} has no size")
  for name in sorted(by_name):
    problems.append(f"BUILD: {MACRO} {name!r} runs tests/{name}.py, which does not exist")
  for target in targets:
    scripts = [
        src for src in target["srcs"] if src.startswith("tests/") and src.endswith("_test.py")
    ]
    if not target["macro"] and scripts:
      problems.append(f"BUILD: {target['rule']} {target['name']!r} has {scripts[0]} in srcs; "
                      f"use {MACRO} (run as a script, a test file runs no test)")
  return problems


def macro_problems(root: pathlib.Path) -> list[str]:
  """build_defs.bzl's kvattn_py_test no longer a py_test running RUNNER on the named file."""
  if not (root / RUNNER).is_file():
    return [f"{RUNNER}: missing; every {MACRO} runs it"]
  bzl = load_bzl(root)
  [call] = expand_macro(bzl, name="a_test", size="small", deps=[":a"], tags=["t"])
  want = {
      "rule": "py_test",
      "name": "a_test",
      "size": "small",
      "main": RUNNER,
      "args": ["$(rootpath tests/a_test.py)"],
      "env": bzl["TEST_ENV"],
      "tags": ["t"]
  }
  problems = [
      f"{BZL}: {MACRO}(name = 'a_test') gives {key} = {call.get(key)!r}, not {value!r}"
      for key, value in want.items() if call.get(key) != value
  ]
  if sorted(call.get("srcs", [])) != sorted(["tests/a_test.py", RUNNER]):
    problems.append(f"{BZL}: {MACRO}'s srcs are {call.get('srcs')}, not the file and {RUNNER}")
  if sorted(call.get("deps", [])) != [":a", ":conftest"]:
    problems.append(f"{BZL}: {MACRO}'s deps are {call.get('deps')}, not its own and :conftest")
  return problems


def module_problems(root: pathlib.Path, build_text: str) -> list[str]:
  """kvattn/, examples/ and tests/ modules in no target's srcs, and srcs not in the tree."""
  targets = parse_targets(build_text, root)
  covered = {src for t in targets for src in t["srcs"]}
  modules = sorted(
      p.relative_to(root).as_posix() for d in ("kvattn", "examples", "tests")
      for p in (root / d).rglob("*.py") if not p.name.endswith("_test.py"))
  return [f"{rel}: in no target's srcs in BUILD" for rel in modules if rel not in covered] + [
      f"BUILD: :{t['name']} has {src} in srcs, which does not exist"
      for t in targets if not t["macro"] for src in t["srcs"] if not (root / src).exists()
  ]


_PACKAGES = ("kvattn", "examples", "tests")


def imported_files(root: pathlib.Path, source: str) -> tuple[set[str], set[str]]:
  """The project files a module imports at module level, and the package __init__s.

  Returns (modules, inits): `from kvattn import sampling` gives
  kvattn/sampling.py in modules and kvattn/__init__.py in inits. A target
  must depend on its modules; it may depend on the inits (without one, Bazel
  puts an empty __init__.py in the runfiles). Imports inside functions are
  left out: they break an import cycle (kvattn/_checks.py) or load an
  optional extra, and a BUILD cannot have a cycle.
  """
  modules, inits = set(), set()

  def add(dotted: str) -> bool:
    parts = dotted.split(".")
    if parts[0] not in _PACKAGES:
      return False
    for i in range(1, len(parts)):
      inits.add("/".join(parts[:i]) + "/__init__.py")
    if (root / ("/".join(parts) + ".py")).exists():
      modules.add("/".join(parts) + ".py")
      return True
    if (root / "/".join(parts) / "__init__.py").exists():
      modules.add("/".join(parts) + "/__init__.py")
      return True
    return False

  def visit(body):
    for node in body:
      if isinstance(node, ast.Import):
        for alias in node.names:
          add(alias.name)
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        if not any([add(f"{node.module}.{alias.name}") for alias in node.names]):
          add(node.module)
      elif isinstance(node, (ast.If, ast.Try)):
        visit(node.body)
        visit(node.orelse)
        for handler in getattr(node, "handlers", []):
          visit(handler.body)
        visit(getattr(node, "finalbody", []))

  visit(ast.parse(source).body)
  return modules, inits - modules


def dep_problems(root: pathlib.Path, build_text: str) -> list[str]:
  """Targets whose deps are not what their sources import.

  Every imported project module must be in the target's own srcs or in a
  direct dep's srcs, and every dep must provide an imported module or package
  __init__, except :conftest, which pytest loads rather than the test (each
  kvattn_py_test gets it). What a target runs or reads (an example run as a
  subprocess, code in the README) goes in `data`, which this does not check.
  """
  targets = {t["name"]: t for t in parse_targets(build_text, root)}
  problems = []
  for name, target in sorted(targets.items()):
    modules, inits = set(), set()
    for src in target["srcs"]:
      if (root / src).exists():
        m, i = imported_files(root, (root / src).read_text(encoding="utf-8"))
        modules, inits = modules | m, inits | i
    deps = [d.lstrip(":") for d in target["deps"]]
    provided = {src: dep for dep in deps for src in targets.get(dep, {}).get("srcs", [])}
    for rel in sorted(modules - set(target["srcs"]) - set(provided)):
      problems.append(f":{name} imports {rel} but no direct dep has it in srcs")
    used = {provided[rel] for rel in modules | inits if rel in provided}
    for dep in deps:
      if dep not in used and dep != "conftest":
        problems.append(f":{name} depends on :{dep} but imports none of its srcs")
  return problems


def readme_problems(root: pathlib.Path, build_text: str) -> list[str]:
  """Modules the ```python blocks of the README and docs/ import that :readme_test lacks in data.

  tests/readme_test.py runs those blocks, so their imports are runtime deps:
  targets in its data.
  """
  targets = {t["name"]: t for t in parse_targets(build_text, root)}
  blocks = [
      block for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]
      for block in re.findall(r"```python\n(.*?)```", page.read_text(
          encoding="utf-8"), flags=re.DOTALL)
  ]
  modules = set()
  for block in blocks:
    modules |= imported_files(root, block)[0]
  data = targets.get("readme_test", {}).get("data", [])
  provided = {src for d in data for src in targets.get(d.lstrip(":"), {}).get("srcs", [])}
  return [
      f":readme_test runs README code importing {rel}; no target in its data has it"
      for rel in sorted(modules - provided)
  ]


def env_problems(root: pathlib.Path, build_text: str) -> list[str]:
  """A TEST_ENV whose XLA flags differ from conftest's, or plain py_tests without it.

  pytest loads conftest.py before a test file, but a py_test that runs a
  script (not pytest) imports jax before anything sets the flags.
  """
  flags = load_bzl(root)["TEST_ENV"]["XLA_FLAGS"].split()
  conftest = ast.parse((root / "tests" / "conftest.py").read_text(encoding="utf-8"))
  want = next(
      ast.literal_eval(n.value) for n in conftest.body
      if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "_FLAGS")
  problems = [] if flags == list(want) else [
      f"{BZL}: TEST_ENV's XLA_FLAGS {flags} differ from tests/conftest.py's {list(want)}"
  ]
  for node in ast.walk(ast.parse(build_text, filename="BUILD")):
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "py_test":
      env = next((kw.value for kw in node.keywords if kw.arg == "env"), None)
      name = next(ast.literal_eval(kw.value) for kw in node.keywords if kw.arg == "name")
      if getattr(env, "id", None) != "TEST_ENV":
        problems.append(f"py_test {name!r} has no `env = TEST_ENV`")
  return problems


def _build_text() -> str:
  return (ROOT / "BUILD").read_text(encoding="utf-8")


def test_every_test_file_runs_under_bazel():
  assert (ROOT / "tests" / "build_test.py").exists()
  problems = bazel_test_problems(ROOT, _build_text())
  assert not problems, "\n".join(problems)


def test_the_macro_runs_the_named_file_under_pytest():
  problems = macro_problems(ROOT)
  assert not problems, "\n".join(problems)


def test_every_module_has_a_target():
  problems = module_problems(ROOT, _build_text())
  assert not problems, "\n".join(problems)


def test_readme_code_has_its_modules_in_data():
  problems = readme_problems(ROOT, _build_text())
  assert not problems, "\n".join(problems)


def test_deps_are_what_the_sources_import():
  problems = dep_problems(ROOT, _build_text())
  assert not problems, "\n".join(problems)


def test_every_test_gets_the_conftest_xla_flags():
  problems = env_problems(ROOT, _build_text())
  assert not problems, "\n".join(problems)


# --- The runner fails unless tests ran and passed.


@pytest.mark.parametrize(
    "source, argv, code",
    [
        (None, [], 2),  # no file
        (None, ["tests/missing_test.py"], 2),
        ("def test_x():\n  pass\n", ["tests/a_test.py"], 0),
        ("def test_x():\n  assert False\n", ["tests/a_test.py"], 1),
        ("def helper():\n  pass\n", ["tests/a_test.py"], 5),  # no test collected
        ("def test_x():\n  pass\n\ndef test_y():\n  assert False\n",
         ["tests/a_test.py", "-k", "test_x"], 0),  # the rest go to pytest
    ])
def test_runner_exit_code(tmp_path, source, argv, code):
  (tmp_path / "tests").mkdir()
  if source is not None:
    (tmp_path / "tests" / "a_test.py").write_text(source)
  run = subprocess.run([sys.executable, str(ROOT / RUNNER), *argv], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
  assert run.returncode == code, run.stdout + run.stderr


# --- The checks themselves catch what they should.

_GOOD_BUILD = """
load("//:build_defs.bzl", "kvattn_py_test")

kvattn_py_test(
    name = "a_test",
    size = "small",
)
"""


@pytest.fixture
def tree(tmp_path):
  (tmp_path / "tests").mkdir()
  (tmp_path / "tests" / "a_test.py").write_text("def test_x():\n  pass\n")
  shutil.copy(ROOT / BZL, tmp_path / BZL)
  shutil.copy(ROOT / RUNNER, tmp_path / RUNNER)
  return tmp_path


def test_check_passes_a_good_tree(tree):
  assert bazel_test_problems(tree, _GOOD_BUILD) == []
  assert macro_problems(tree) == []
  assert dep_problems(tree, _GOOD_BUILD) == []


def test_check_fails_without_a_target_or_a_file(tree):
  (tree / "tests" / "b_test.py").write_text("")
  (tree / "tests" / "a_test.py").unlink()
  assert bazel_test_problems(tree, _GOOD_BUILD) == [
      'tests/b_test.py: no kvattn_py_test(name = "b_test", ...) in BUILD',
      "BUILD: kvattn_py_test 'a_test' runs tests/a_test.py, which does not exist",
  ]


def test_check_fails_without_size(tree):
  build = _GOOD_BUILD.replace('    size = "small",\n', "")
  assert bazel_test_problems(tree,
                             build) == ["tests/a_test.py: kvattn_py_test 'a_test' has no size"]


def test_check_fails_for_a_test_file_run_as_a_script(tree):
  build = ('py_test(name = "a_script", size = "small", srcs = ["tests/a_test.py"], '
           'main = "tests/a_test.py")\n')
  assert bazel_test_problems(tree, _GOOD_BUILD + build) == [
      "BUILD: py_test 'a_script' has tests/a_test.py in srcs; use kvattn_py_test "
      "(run as a script, a test file runs no test)"
  ]


def test_macro_check_fails_without_the_runner(tree):
  bzl = (tree / BZL).read_text()
  (tree / BZL).write_text(bzl.replace("main = _RUNNER", "main = src"))
  [problem] = macro_problems(tree)
  assert problem.startswith(f"{BZL}: kvattn_py_test(name = 'a_test') gives main = ")
  (tree / RUNNER).unlink()
  assert macro_problems(tree) == [f"{RUNNER}: missing; every kvattn_py_test runs it"]


def test_module_check_fails_for_a_module_without_target(tree):
  assert module_problems(tree, _GOOD_BUILD) == []
  (tree / "kvattn").mkdir()
  (tree / "kvattn" / "new.py").write_text("")
  (tree / "tests" / "helper.py").write_text("")
  build = _GOOD_BUILD + 'py_library(name = "gone", srcs = ["kvattn/gone.py"])\n'
  assert module_problems(tree, build) == [
      "kvattn/new.py: in no target's srcs in BUILD",
      "tests/helper.py: in no target's srcs in BUILD",
      "BUILD: :gone has kvattn/gone.py in srcs, which does not exist",
  ]


def test_dep_check_fails_for_a_missing_or_unused_dep(tree):
  (tree / "kvattn").mkdir()
  (tree / "kvattn" / "__init__.py").write_text("from kvattn.a import f\n")
  (tree / "kvattn" / "a.py").write_text("def f():\n  from kvattn import b  # lazy: ignored\n")
  (tree / "kvattn" / "b.py").write_text("import jax\nfrom kvattn import a\n")
  (tree / "kvattn" / "c.py").write_text("import kvattn.a\nimport kvattn.b\n")
  (tree / "tests" / "a_test.py").write_text("from kvattn import c\n")
  build = """
py_library(name = "a", srcs = ["kvattn/a.py"])
py_library(name = "b", srcs = ["kvattn/b.py"], deps = [":a"])
py_library(name = "c", srcs = ["kvattn/c.py"], deps = [":b"])
py_library(name = "kvattn", srcs = ["kvattn/__init__.py"], deps = [":a"])
kvattn_py_test(name = "a_test", size = "small", deps = [":a"])
"""
  assert dep_problems(tree, build) == [
      ":a_test imports kvattn/c.py but no direct dep has it in srcs",
      ":a_test depends on :a but imports none of its srcs",
      ":c imports kvattn/a.py but no direct dep has it in srcs"
  ]
  fixed = build.replace('deps = [":b"]',
                        'deps = [":a", ":b"]').replace('"a_test", size = "small", deps = [":a"]',
                                                       '"a_test", size = "small", deps = [":c"]')
  assert dep_problems(tree, fixed) == []
  # Depending on the package's __init__ target is allowed, not required.
  assert dep_problems(tree, fixed.replace('deps = [":a", ":b"]',
                                          'deps = [":a", ":b", ":kvattn"]')) == []
  assert dep_problems(tree, fixed.replace('deps = [":a"]', 'deps = [":a", ":c"]',
                                          1)) == [":b depends on :c but imports none of its srcs"]
