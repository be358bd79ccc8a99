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
