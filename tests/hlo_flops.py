"""An independent FLOP count for the compute-accounting tests: every `dot` of a compiled XLA program,
from its shapes, in XLA's optimised HLO text (after dead-code elimination and fusion), each multiplied
by the trip counts of the while loops around it (the scanned layers)."""

from __future__ import annotations

import math
import re

_HEADER = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \((.*)\) -> .* \{$")
_PARAM = re.compile(r"([\w.\-]+): \w+\[([\d,]*)\]")
_DEF = re.compile(r"%([\w.\-]+) = \w+\[([\d,]*)\]")
_DOT = re.compile(r"%([\w.\-]+) = \w+\[([\d,]*)\]\S* dot\((?:\S+ )?%([\w.\-]+), (?:\S+ )?%([\w.\-]+)\),"
                  r".*?lhs_contracting_dims=\{([\d,]*)\}")
_CALLS = re.compile(r"(?:calls|to_apply|body|branch_computations)=\{?((?:%[\w.\-]+(?:, )?)+)\}?")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _shape(s: str) -> tuple[int, ...]:
  return tuple(int(x) for x in s.split(",") if x)


def dot_flops(hlo_text: str) -> int:
  """2 x (multiply-adds) of every dot the program executes."""
  comps: dict[str, dict] = {}
  entry = None
  cur = None
  for line in hlo_text.splitlines():
    m = _HEADER.match(line)
    if m:
      cur = {"shapes": {n: _shape(s) for n, s in _PARAM.findall(m.group(2))}, "dots": 0, "calls": []}
      comps[m.group(1)] = cur
      if line.startswith("ENTRY"):
        entry = m.group(1)
      continue
    if cur is None or not line.startswith("  "):
      continue
    d = _DEF.search(line)
    if d:
      cur["shapes"][d.group(1)] = _shape(d.group(2))
    m = _DOT.search(line)
    if m:
      out, lhs, contract = _shape(m.group(2)), cur["shapes"][m.group(3)], _shape(m.group(5))
      cur["dots"] += 2 * math.prod(out) * math.prod(lhs[c] for c in contract)
    for c in _CALLS.finditer(line):
      factor = 1
      if " while(" in line and c.group(0).startswith("body="):
        trip = _TRIP.search(line)
        assert trip, f"a while loop without a known trip count: {line[:200]}"
        factor = int(trip.group(1))
      for name in re.findall(r"%([\w.\-]+)", c.group(1)):
        cur["calls"].append((name, factor))
  assert entry is not None, "no ENTRY computation in the HLO text"

  def total(name: str) -> int:
    c = comps[name]
    return c["dots"] + sum(f * total(callee) for callee, f in c["calls"] if callee in comps)

  return total(entry)
