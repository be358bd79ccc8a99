"""The `wiki_stdlib` corpus: the shipped Wikipedia summaries mixed with the running interpreter's standard
library, cut into summary-sized documents. Topics that differ in kind (prose, code, API documentation),
not only in subject, from what every machine has offline.

Documents, each labelled by origin (`Corpus.labels`, so NMI/ARI and per-topic tables read by domain):
- `wiki/<topic>`: the 10,033 summaries with their 12 topic labels (mean 486 characters);
- `stdlib/code`: the source of the standard library's modules with their docstrings removed, cut at
  blank lines into pieces of at most `CHUNK_CHARS` characters (a longer block alone, cut at `MAX_CHARS`);
- `stdlib/doc`: the module, class and function docstrings (`ast.get_docstring`, cleaned), in file order,
  cut the same way at paragraph boundaries.
The standard library is `sysconfig.get_paths()["stdlib"]` of the running interpreter: every `*.py`
below it, in sorted path order, except `site-packages`, tests, caches and the generated tables of
`SKIP_DIRS`; a file that is not UTF-8 or does not parse is skipped. Of each kind the `PER_KIND` pieces
with the smallest salted title hash are kept (a uniform sample over files), and all documents,
summaries included, are ordered by the hash of their title, so any `data.max_docs` prefix keeps the mix.

Deterministic on a given interpreter version (its version and standard-library path are recorded in
the corpus stats, hence in `topics/done/embed.json`); another version gives another corpus. Size on
CPython 3.11.7 (this machine; 607 files): 10,033 summaries + 2,500 code + 2,500 docstring documents
(15,031 after the corpus filter drops 2 exact duplicates), two thirds prose from Wikipedia and one
third from the standard library (of 14,784 code and 3,714 docstring pieces available; mean 529 and 475
characters).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import pathlib
import platform
import sysconfig
from typing import Iterable, Iterator

CHUNK_CHARS = 600  # most characters of a standard-library document (the summaries' mean is 486)
MAX_CHARS = 960  # no document is longer: a longer line or paragraph is cut
PER_KIND = 2500  # documents kept of each standard-library kind (code, doc)
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
                       "encodings", "pydoc_data", "__phello__"})  # tests, caches, generated tables
KINDS = ("code", "doc")


def stdlib_root() -> pathlib.Path:
  """The running interpreter's standard-library directory."""
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: pathlib.Path) -> list[pathlib.Path]:
  """The `*.py` files of the standard library, sorted, without `SKIP_DIRS` and `config-*` dirs."""
  out = []
  for f in root.rglob("*.py"):
    parts = f.relative_to(root).parts[:-1]
    if not any(p in SKIP_DIRS or p.startswith("config-") for p in parts):
      out.append(f)
  return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def split_source(text: str) -> tuple[str, list[str]]:
  """`(code without docstrings, [docstrings in order])` of a module's source (SyntaxError if it does
  not parse)."""
  tree = ast.parse(text)
  lines = text.splitlines()
  drop: set[int] = set()
  docs: list[str] = []
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      doc = ast.get_docstring(node, clean=True)
      if doc:
        first = node.body[0]
        docs.append((first.lineno, doc))
        drop.update(range(first.lineno - 1, first.end_lineno))
  code = "\n".join(line for i, line in enumerate(lines) if i not in drop)
  return code, [d for _, d in sorted(docs)]


def chunks(blocks: Iterable[str], target: int = CHUNK_CHARS, cap: int = MAX_CHARS) -> list[str]:
  """Greedy packing of text blocks (paragraphs / line groups) into pieces of at most `target`
  characters (a single longer block alone, cut at `cap`); whitespace-only blocks are dropped."""
  out, cur = [], ""
  for block in blocks:
    block = block.strip("\n")
    if not block.strip():
      continue
    if cur and len(cur) + 1 + len(block) > target:
      out.append(cur)
      cur = ""
    cur = f"{cur}\n{block}" if cur else block
    while len(cur) > cap:  # one block longer than a document: cut it
      out.append(cur[:cap])
      cur = cur[cap:]
  if cur.strip():
    out.append(cur)
  return out


def _code_blocks(code: str) -> list[str]:
  """Groups of lines separated by blank lines."""
  blocks, cur = [], []
  for line in code.splitlines():
    if line.strip():
      cur.append(line.rstrip())
    elif cur:
      blocks.append("\n".join(cur))
      cur = []
  if cur:
    blocks.append("\n".join(cur))
  return blocks


def _hash(title: str) -> bytes:
  return hashlib.blake2b(title.encode("utf-8", "replace"), digest_size=8).digest()


@functools.lru_cache(maxsize=2)
def stdlib_documents(root: str) -> tuple[tuple[tuple[str, str, str], ...], dict]:
  """`((text, label, title), ...)` kept from the standard library at `root`, and their counts."""
  base = pathlib.Path(root)
  pieces: dict[str, list[tuple[str, str, str]]] = {k: [] for k in KINDS}
  skipped = 0
  files = stdlib_files(base)
  for f in files:
    rel = f.relative_to(base).as_posix()
    try:
      code, docs = split_source(f.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, SyntaxError, ValueError):
      skipped += 1
      continue
    for kind, blocks in (("code", _code_blocks(code)), ("doc", [p for d in docs for p in d.split("\n\n")])):
      for i, text in enumerate(chunks(blocks)):
        pieces[kind].append((text, f"stdlib/{kind}", f"{rel} ({kind} {i})"))
  # the sample uses its own salt: the order of the mixed corpus (`wiki_stdlib_raw`) is the unsalted hash
  kept = {k: sorted(v, key=lambda r: _hash("keep:" + r[2]))[:PER_KIND] for k, v in pieces.items()}
  info = {"python_version": platform.python_version(), "stdlib_dir": str(base), "stdlib_files": len(files),
          "stdlib_files_skipped": skipped, "stdlib_available": {k: len(v) for k, v in pieces.items()},
          "stdlib_kept": {k: len(v) for k, v in kept.items()}}
  return tuple(r for k in KINDS for r in kept[k]), info


def source_info() -> dict:
  """What the corpus stats record of the standard-library part (interpreter version, path, counts)."""
  return stdlib_documents(str(stdlib_root()))[1]


def wiki_stdlib_raw(wiki_raw: Iterable[tuple]) -> Iterator[tuple]:
  """The raw records `(text, label, title, problem, where)` of the mixed corpus: the summaries (labels
  prefixed `wiki/`) and the standard-library documents (`where` = their file), all in title-hash order."""
  recs = [(text, None if label is None else f"wiki/{label}", title, problem, where)
          for text, label, title, problem, where in wiki_raw]
  base = stdlib_root()
  recs += [(text, label, title, None, f"{base}/{title}")
           for text, label, title in stdlib_documents(str(base))[0]]
  recs.sort(key=lambda r: _hash(r[2]))
  yield from recs
