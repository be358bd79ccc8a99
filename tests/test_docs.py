"""Every public function, method and class of the package, configs and launcher has a docstring."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def undocumented(directory: pathlib.Path) -> list[str]:
  """`file:line: name` of each public def/class without a docstring (private modules and names skipped)."""
  missing = []
  for path in sorted(directory.rglob("*.py")):
    if path.name.startswith("_") and path.name not in ("__init__.py", "__main__.py"):
      continue

    def visit(node, prefix):
      for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
          if child.name.startswith("_"):
            continue
          if ast.get_docstring(child) is None:
            missing.append(f"{path.relative_to(ROOT)}:{child.lineno}: {prefix}{child.name}")
          if isinstance(child, ast.ClassDef):
            visit(child, f"{prefix}{child.name}.")

    visit(ast.parse(path.read_text()), "")
  return missing


def test_scanner_finds_a_missing_docstring(tmp_path):
  (tmp_path / "m.py").write_text('def f():\n  """Doc."""\n\nclass C:\n  def g(self):\n    pass\n'
                                 '  def _h(self):\n    pass\n')
  global ROOT
  root, ROOT = ROOT, tmp_path
  try:
    assert undocumented(tmp_path) == ["m.py:4: C", "m.py:5: C.g"]
  finally:
    ROOT = root


def test_every_public_definition_has_a_docstring():
  missing = [m for d in ("mixie", "configs", "launch") for m in undocumented(ROOT / d)]
  assert not missing, "public definitions without a docstring:\n" + "\n".join(missing)


# --- size: no module of mixie/ over MAX_FILE_LINES lines, no function over MAX_FUNCTION_LINES ----------

MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 80
# The justified exceptions, "path" (a module) or "path:Qualified.name" (a function), each with its reason.
# An entry that is no longer needed fails the test too, so that the list stays true.
SIZE_EXCEPTIONS: dict[str, str] = {}


def oversized(directory: pathlib.Path, root: pathlib.Path) -> dict[str, int]:
  """Lines of each module over `MAX_FILE_LINES` (`path`) and of each function or method over
  `MAX_FUNCTION_LINES` (`path:Qualified.name`; nested ones too) below `directory`."""
  found = {}
  for path in sorted(directory.rglob("*.py")):
    rel, text = str(path.relative_to(root)), path.read_text()
    if len(text.splitlines()) > MAX_FILE_LINES:
      found[rel] = len(text.splitlines())

    def visit(node, prefix):
      for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
          name = f"{prefix}{child.name}"
          n = child.end_lineno - child.lineno + 1
          if not isinstance(child, ast.ClassDef) and n > MAX_FUNCTION_LINES:
            found[f"{rel}:{name}"] = n
          visit(child, f"{name}.")

    visit(ast.parse(text), "")
  return found


def test_size_scanner_finds_long_modules_and_functions(tmp_path):
  body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
  (tmp_path / "m.py").write_text(f"class C:\n  def g(self):\n{body}\n    return 0\n\n"
                                 f"def short():\n  return 1\n")
  (tmp_path / "big.py").write_text("x = 1\n" * (MAX_FILE_LINES + 1))
  (tmp_path / "ok.py").write_text("x = 1\n" * MAX_FILE_LINES)
  assert oversized(tmp_path, tmp_path) == {"big.py": MAX_FILE_LINES + 1,
                                           "m.py:C.g": MAX_FUNCTION_LINES + 2}


def test_modules_and_functions_stay_small():
  """Split what grows past the limits; an exception goes into SIZE_EXCEPTIONS with its reason."""
  found = oversized(ROOT / "mixie", ROOT)
  unexplained = {k: n for k, n in found.items() if k not in SIZE_EXCEPTIONS}
  assert not unexplained, (f"over {MAX_FILE_LINES} lines (a module) or {MAX_FUNCTION_LINES} (a function), "
                           f"with no reason in SIZE_EXCEPTIONS: {unexplained}")
  stale = sorted(set(SIZE_EXCEPTIONS) - set(found))
  assert not stale, f"SIZE_EXCEPTIONS entries within the limits now (remove them): {stale}"
