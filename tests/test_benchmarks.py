"""A benchmark that benchmarks/RESULTS.md quotes runs on the library as it is now
(benchmarks/conflict_linear.py stopped running after the feature store changed, unnoticed).
Only head_variants.py is covered here so far; the other benchmarks have no such test."""

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_head_variants_runs_every_kind_of_variant(tiny_run, tiny_data):
    done = subprocess.run([sys.executable, str(BENCHMARKS / "head_variants.py"), str(tiny_run), str(tiny_data),
                           "--variants", "last,base,swa=1,wd=1+mix=0.4,ls=0.1+drop=0.5,cw=0,teach=2",
                           "--seeds", "0", "--boot", "20", "--against", "last"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "| 0 |" in line]
    assert [row.split("|")[1].strip() for row in rows] == ["last", "base", "swa=1", "wd=1+mix=0.4",
                                                           "ls=0.1+drop=0.5", "cw=0", "teach=2"]
    assert all("(" in row for row in rows[1:])  # each paired with `last`
    bad = subprocess.run([sys.executable, str(BENCHMARKS / "head_variants.py"), str(tiny_run), str(tiny_data),
                          "--variants", "bogus=1"], capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "unknown variant 'bogus=1'" in bad.stderr
