"""tools/mutation_check.py: every entry applies to today's code, or the check says which not.

The audit plants each entry's bug in a copy of the repo and runs the entry's tests (heavy:
run by hand). Here only its bookkeeping, which is cheap: an entry whose pattern no longer
occurs exactly once (the code moved on) must be an error that names the entry and the
pattern, never a silently dropped row of the audit.
"""

import os

from tools import mutation_check as mc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_entry_applies_to_todays_code_and_names_existing_tests():
  problems = mc._problems(ROOT, mc.MUTATIONS)  # pylint: disable=protected-access
  assert problems == [], "\n".join(problems)
  names = [m.name for m in mc.MUTATIONS]
  assert len(names) == len(set(names)), "duplicate mutation names"
  for m in mc.MUTATIONS:
    assert m.old != m.new, m.name
    files = [a.split("::")[0] for a in m.tests if a.startswith("tests/")]
    assert files and all(os.path.isfile(os.path.join(ROOT, f)) for f in files), m.name


def test_a_missing_pattern_is_an_error_naming_the_entry_and_the_pattern(capsys, monkeypatch):
  gone = mc.Mutation(
    "an-entry", "crmjax/losses.py", "text that is not there", "x", ("tests/test_losses.py",), "-"
  )
  twice = mc.Mutation("twice", "crmjax/losses.py", "import", "x", ("tests/test_losses.py",), "-")
  missing = mc.Mutation("nofile", "crmjax/nothing.py", "a", "b", ("tests/test_losses.py",), "-")
  assert "'an-entry'" in gone.problem(ROOT) and "'text that is not there'" in gone.problem(ROOT)
  assert "occurs 0 times in crmjax/losses.py" in gone.problem(ROOT)
  assert "twice" in twice.problem(ROOT) and "not once" in twice.problem(ROOT)
  assert "does not exist" in missing.problem(ROOT)
  monkeypatch.setattr(mc, "MUTATIONS", [*mc.MUTATIONS[:2], gone])
  assert mc.main(["--list"]) == 2
  out = capsys.readouterr()
  assert "ERROR: mutation 'an-entry'" in out.err and "'text that is not there'" in out.err
  # nothing runs: the check stops before copying the repo or running any test
  assert mc.main(["--no-baseline"]) == 2
  assert "copy:" not in capsys.readouterr().out
