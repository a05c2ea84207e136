"""A benchmark that benchmarks/RESULTS.md quotes runs on the library as it is now
(benchmarks/conflict_linear.py stopped running after the feature store changed, unnoticed).
Covered: head_variants.py, int8_check.py, crossfit_epochs.py, finetune_step.py, compare_oof.py,
shifted_copy.py; the other benchmarks have no such test yet."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_int8_check_compares_int8_with_fp32(tiny_run, tiny_data, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "run")  # the script writes RUN/export; keep the shared run as it is
    done = subprocess.run([sys.executable, str(BENCHMARKS / "int8_check.py"), str(run), str(tiny_data),
                           "--bits", "auto,7,8", "--boot", "20"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split("|")[1].strip() for line in done.stdout.splitlines() if line.startswith("| ") and "|---" not in line]
    width = 8 if "VNNI or AMX: True" in done.stdout else 7  # `auto`: the width the export uses on this CPU
    assert rows[1:] == ["fp32", f"int8, {width}-bit weights (auto)", "int8, 7-bit weights (7)", "int8, 8-bit weights (8)"]
    assert (run / "export" / "model.onnx").is_file() and not (run / "export" / "model.int8.onnx").exists()


def test_crossfit_epochs_compares_three_policies(tmp_path):
    import xferlearn
    from conftest import TINY, make_folder

    data = make_folder(tmp_path / "data", per_class=20)
    run = xferlearn.train(data=str(data), out=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                          **{**TINY, "backbone": "resnet18+resnet10t", "epochs": 3}).run_dir
    done = subprocess.run([sys.executable, str(BENCHMARKS / "crossfit_epochs.py"), str(run), str(data),
                           "--images", "24", "--subsets", "0", "--boot", "20"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split("|") for line in done.stdout.splitlines() if line.startswith("| 0 |")]
    assert [row[2].strip() for row in rows] == ["member", "shared", "last", "resnet18", "resnet10t"]
    assert rows[2][3].strip() == "3, 3" and all("(" in row[10] for row in rows[1:3])
    assert all("(" in row[6] for row in rows[3:])  # each member alone: last epoch against its own count


def test_finetune_step_times_both_engines_per_depth():
    done = subprocess.run([sys.executable, str(BENCHMARKS / "finetune_step.py"), "--backbone", "resnet18",
                           "--depths", "2,all", "--size", "32", "--batch", "4", "--seconds", "0.2", "--rounds", "1"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split("|") for line in done.stdout.splitlines() if line.startswith("| 2 |") or line.startswith("| all |")]
    assert [row[1].strip() for row in rows] == ["2", "all"]
    assert "blocks frozen" in rows[0][2] and "no split" in rows[1][2]
    assert float(rows[0][6]) < 1e-3  # the two engines' logits differ by rounding only


def test_compare_oof_pairs_two_cross_fitted_runs_and_refuses_a_held_out_one(tmp_path, tiny_run):
    import xferlearn
    from conftest import TINY, make_folder

    data = make_folder(tmp_path / "data", per_class=12)
    runs = [xferlearn.train(data=str(data), out=str(tmp_path / name), cache_dir=str(tmp_path / "cache"),
                            **{**TINY, "cv": 3, "epochs": epochs}).run_dir for name, epochs in (("a", 3), ("b", 1))]
    done = subprocess.run([sys.executable, str(BENCHMARKS / "compare_oof.py"), *map(str, runs), "--boot", "20"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    row = [line.split("|") for line in done.stdout.splitlines() if line.startswith("| a vs b |")][0]
    assert row[2].strip() == "24" and all("(" in row[i] and " to " in row[i] for i in (4, 6))
    held_out = subprocess.run([sys.executable, str(BENCHMARKS / "compare_oof.py"), str(runs[0]), str(tiny_run)],
                              capture_output=True, text=True, timeout=600)
    assert held_out.returncode != 0 and "was not cross-fitted" in held_out.stderr


def test_shifted_copy_holds_the_images_the_stress_test_scores(tiny_run, tiny_data, tmp_path):
    import numpy as np

    from xferlearn._io import content_hash
    from xferlearn.data.images import DecodeCache
    from xferlearn.evaluation.stress import decode_all, shifted_probabilities
    from xferlearn.models.checkpoint import load_checkpoint
    from xferlearn.models.predictor import Predictor

    done = subprocess.run([sys.executable, str(BENCHMARKS / "shifted_copy.py"), str(tiny_data), str(tmp_path / "copy"),
                           "--shift", "text", "--severity", "5", "--like", str(tiny_run)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    checkpoint = load_checkpoint(tiny_run)
    predictor, cache = Predictor(checkpoint), DecodeCache.of(checkpoint.preprocessing, tmp_path / "cache")
    originals = sorted(p for p in tiny_data.rglob("*") if p.is_file())
    copies = [tmp_path / "copy" / p.parent.name / (p.stem + ".png") for p in originals]

    def probabilities(paths, shift, severity):
        digests = [content_hash(p.read_bytes()) for p in paths]
        return shifted_probabilities(predictor, decode_all(paths, digests, cache), digests, shift, severity)

    stressed = probabilities(originals, "text", 5)  # what `xferlearn stress` scores
    assert np.abs(probabilities(copies, "clean", 0) - stressed).max() < 1e-5
    assert np.abs(probabilities(originals, "clean", 0) - stressed).max() > 1e-3  # the shift moved them
