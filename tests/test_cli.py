"""The stages' shared command line (`mixie.cli`): every stage is `python -m mixie.<stage>` through its
package's `__main__.py`, and a mistake on the command line ends as one `mixie: error:` line, exit 2."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("cluster", "train", "evaluate", "generate", "export", "experts", "sweep")


def _run(*args, timeout=120):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)


def test_every_stage_is_a_package_with_a_main_and_no_module_is_a_keyword():
  import keyword

  for stage in STAGES:
    main = ROOT / "mixie" / stage / "__main__.py"
    assert main.exists(), main
    assert "cli.run(main)" in main.read_text(), main
  names = [p.stem for p in (ROOT / "mixie").rglob("*.py")] + [p.name for p in (ROOT / "mixie").rglob("*")
                                                             if p.is_dir()]
  assert not [n for n in names if keyword.iskeyword(n)]
  main_guard = re.compile(r'^if __name__ == "__main__":', re.M)
  assert not [p for p in (ROOT / "mixie").glob("*.py") if main_guard.search(p.read_text())]  # no module CLIs


@pytest.mark.parametrize("args, message", [
    (["mixie.train", "--config.train.slotz=3"],
     "mixie: error: --config.train.slotz=3: config.train has no field 'slotz' (did you mean 'slots'?)"),
    (["mixie.evaluate", "--config.trian.slots=3"],
     "mixie: error: --config.trian.slots=3: config has no field 'trian' (did you mean 'train'?)"),
    (["mixie.cluster", "--config.train.slots=many"],
     "mixie: error: flag --config.train.slots=many: invalid literal for int() with base 10: 'many'"),
    (["mixie.generate", "--promt=hi"],
     "mixie: error: Unknown command line flag 'promt'. Did you mean: prompt ?"),
])
def test_a_command_line_mistake_is_one_error_line_and_exit_status_2(args, message):
  p = _run(args[0], "--config=configs/demo.py:tiny", *args[1:])
  assert p.returncode == 2, p.stderr
  assert p.stderr.strip().splitlines() == [message]


def test_a_config_file_that_does_not_load_is_one_error_line(tmp_path):
  p = _run("mixie.train", f"--config={tmp_path / 'nope.py'}")
  assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
  assert p.stderr.startswith("mixie: error: --config: ") and "No such file or directory" in p.stderr
  p = _run("mixie.experts", "--config=configs/demo.py:tiny")  # no command
  assert p.returncode == 2 and p.stderr.strip().startswith("mixie: error: give a command: import or list")
