"""Fault injection: kill -9 then --resume, two writers, a full disk at each write point, crafted
checkpoints, and a bounded service soak. Every fault must end in the run continuing, or in one
`xferlearn: error:` line and exit 2, with nothing partial left behind.

A full disk is a per-file size limit (RLIMIT_FSIZE, SIGXFSZ ignored) in a subprocess: writes past
it fail with EFBIG as they would with ENOSPC, needing no root and no mount. Each write point gets
the smallest limit its command's earlier writes fit under.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import TINY, make_folder, synthetic_image

import xferlearn
from xferlearn.cli import main
from xferlearn.errors import XferlearnError
from xferlearn.models.checkpoint import load_checkpoint
from xferlearn.rundir import RunDir

SRC = str(Path(__file__).resolve().parents[1] / "src")
# conftest.TINY's flags: a held-out split (--no-cv), so the fits killed here are the recipe's own.
TINY_FLAGS = ["--backbone", "resnet18", "--weights", "none", "--image-size", "64", "--epochs", "2", "--views", "0",
              "--lr", "0.01", "--no-cv"]
FINETUNE_FLAGS = ["--recipe", "finetune", "--stages", "2", "--finetune-epochs", "2", "--finetune-batch-size", "8",
                  "--lr-backbone", "0.001"]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def cli(args: list[str], file_limit: int | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    """`xferlearn ARGS` in a subprocess, optionally with every file it writes capped at `file_limit` bytes."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    return subprocess.run([sys.executable, "-m", "xferlearn.cli", *args], capture_output=True, text=True,
                          env=env(), timeout=timeout, preexec_fn=limit if file_limit else None)


def one_line_error(result) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("xferlearn: error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    return lines[0]


def leftovers(folder: Path) -> list[Path]:
    """Temporary files or staging folders a failed write left behind."""
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith((".export-", ".int8-"))]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("faults") / "data", per_class=14)


# --- kill -9 at each stage, then --resume --------------------------------------------------------
KILLER = """
import os, signal, sys
import lightning as L
import xferlearn.training.finetune as finetune, xferlearn.training.linear as linear, xferlearn.training.loop as loop
from xferlearn.cli import main

target, original = sys.argv[1], loop.fit

class Kill(L.Callback):
    def __init__(self, stage):
        self.stage = stage

    def on_train_epoch_start(self, trainer, module):  # epoch 1: epoch 0's checkpoints are on disk
        if self.stage == target and trainer.current_epoch == 1:
            os.kill(os.getpid(), signal.SIGKILL)

def fit(*args, stage="", callbacks=None, **kwargs):
    return original(*args, stage=stage, callbacks=[*(callbacks or []), Kill(stage)], **kwargs)

linear.fit = finetune.fit = fit
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("stage", ["", "stage1"])  # the linear recipe's one fit (the head stage's), a fine-tune stage
def test_kill_9_at_each_stage_then_resume(stage, data, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", str(data), "--out", str(run), "--cache-dir", str(tmp_path / "cache"), *TINY_FLAGS,
            *(FINETUNE_FLAGS if stage else [])]
    killed = subprocess.Popen([sys.executable, "-c", KILLER, stage, *args], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env=env())
    _, stderr = killed.communicate(timeout=240)
    assert killed.returncode == -signal.SIGKILL, stderr[-2000:]
    assert (run / "lightning" / stage / "last.ckpt").exists() and not (run / "model.pt").exists()
    head_written = (run / "stages" / "head.pt").stat().st_mtime_ns if stage == "stage1" else None

    assert main([*args, "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"took over a stale lock on {run} left by pid {killed.pid}" in err  # the dead holder is named
    selection = load_checkpoint(run).metrics["selection"]
    assert selection["epochs_run"] == 2 if not stage else [r["stage"] for r in selection["stages"]] == ["head", "stage1"]
    if head_written is not None:  # the finished head stage was resumed, not trained again
        assert (run / "stages" / "head.pt").stat().st_mtime_ns == head_written
    assert not list(run.rglob("*-v1.ckpt")) and not leftovers(run)


# --- case 1: --resume can only resume the same run -----------------------------------------------
def test_a_rerun_clears_an_earlier_attempt_and_resume_refuses_another_run(tmp_path):
    swapped = make_folder(tmp_path / "swapped", classes=("PNEUMONIA", "NORMAL"))  # class folders swapped
    right = make_folder(tmp_path / "right")
    run = tmp_path / "run"
    options = dict(out=str(run), cache_dir=str(tmp_path / "cache"), **{**TINY, "epochs": 1})
    xferlearn.train(data=str(swapped), **options)
    (run / "model.pt").unlink()  # as if killed after its checkpoints were written
    old_last = (run / "lightning" / "last.ckpt").read_bytes()

    xferlearn.train(data=str(right), **options)  # no --resume: the earlier attempt is cleared, not versioned
    assert not list(run.rglob("*-v1.ckpt"))
    assert (run / "lightning" / "last.ckpt").read_bytes() != old_last
    identity = json.loads((run / "identity.json").read_text())["identity"]
    assert torch.load(run / "lightning" / "last.ckpt", weights_only=True)["xferlearn_run_identity"] == identity

    kept = {name: (run / name).read_bytes() for name in ("config.json", "split.json")}
    with pytest.raises(XferlearnError, match=r"holds another run .*choose another --out \(it holds that run's fin"):
        xferlearn.train(data=str(swapped), resume=True, **options)  # a finished model: no "rerun there" advice
    assert {name: (run / name).read_bytes() for name in kept} == kept  # refused before writing a thing
    (run / "model.pt").unlink()
    with pytest.raises(XferlearnError, match="holds another run .*rerun without --resume"):  # another identity
        xferlearn.train(data=str(swapped), resume=True, **options)

    other = tmp_path / "other"  # a foreign checkpoint dropped into this run's folder
    xferlearn.train(data=str(swapped), **{**options, "out": str(other)})
    shutil.copy(other / "lightning" / "last.ckpt", run / "lightning" / "last.ckpt")
    with pytest.raises(XferlearnError, match="belongs to another run"):
        xferlearn.train(data=str(right), resume=True, **options)


# --- case 5: a damaged or malicious last.ckpt under --resume -------------------------------------
class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("damage", ["truncated", "malicious"])
def test_damaged_lightning_checkpoint_under_resume_is_one_line(damage, data, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", str(data), "--out", str(run), "--cache-dir", str(tmp_path / "cache"), *TINY_FLAGS]
    assert main(args) == 0
    (run / "model.pt").unlink()
    last = run / "lightning" / "last.ckpt"
    marker = tmp_path / "PWNED"
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[:1000])
    else:
        exploit = _Exploit()
        exploit.marker = marker
        last.write_bytes(pickle.dumps({"state_dict": exploit}))
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("xferlearn: error: --resume:") and "last.ckpt" in err[-1]
    assert not marker.exists()


# --- case 2: two writers on one run folder --------------------------------------------------------
HOLDER = ("import sys, time; from xferlearn.rundir import RunDir; lock = RunDir(sys.argv[1]).lock('train (holder)'); "
          "lock.__enter__(); print('held', flush=True); time.sleep(120)")


def test_a_second_writer_is_refused_naming_the_holder(data, tmp_path, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True, env=env())
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["train", str(data), "--out", str(run), *TINY_FLAGS]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"pid {holder.pid} on {socket.gethostname()}" in err and "in use" in err
        assert not (run / "config.json").exists()  # refused before writing anything
    finally:
        holder.kill()
        holder.wait()
    with RunDir(run).lock("after"):  # the dead holder's lock is taken over
        assert "took over a stale lock" in capsys.readouterr().err


def test_lock_is_reentrant_and_released():
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        run = RunDir(folder)
        with run.lock("outer"), run.lock("inner"):  # export inside predict, ensure_onnx inside export
            assert "command=outer" in (Path(folder) / ".lock").read_text()
        assert (Path(folder) / ".lock").read_text() == ""  # released cleanly: nobody to report as stale


def test_another_thread_is_a_second_writer(tmp_path):
    import threading

    errors = []

    def second():
        try:
            with RunDir(tmp_path).lock("second"):
                pass
        except XferlearnError as error:
            errors.append(str(error))

    with RunDir(tmp_path).lock("first"):
        thread = threading.Thread(target=second)
        thread.start()
        thread.join()
    assert len(errors) == 1 and "another thread of this process" in errors[0]
    with RunDir(tmp_path).lock("after"):  # released whole: the refused thread took nothing
        pass


# --- case 4: a full disk at each write point ------------------------------------------------------
# 60 MB: room for the head stage's files (stages/head.pt is resnet18's 45 MB), not for stage 1's
# Lightning checkpoint (the weights and Adam's moments of the layers it trains, ~110 MB).
@pytest.mark.parametrize("point, limit", [("config.json", 300), ("lightning checkpoint", 60_000_000)])
def test_full_disk_while_training(point, limit, data, tmp_path):
    run = tmp_path / "run"
    extra = FINETUNE_FLAGS if point == "lightning checkpoint" else []
    line = one_line_error(cli(["train", str(data), "--out", str(run), "--cache-dir", str(tmp_path / "c"),
                               *TINY_FLAGS, *extra], file_limit=limit))
    assert ("config.json" in line) if point == "config.json" else (".ckpt" in line)
    assert not leftovers(run)
    for checkpoint in run.rglob("*.ckpt"):  # whatever is there is whole
        torch.load(checkpoint, weights_only=True)


def test_full_disk_while_exporting_predicting_and_explaining(tiny_run, tiny_data, tmp_path):
    out = tmp_path / "export"
    line = one_line_error(cli(["export", str(tiny_run), "--out", str(out)], file_limit=1_000_000))
    assert str(out) in line and not (out / "model.onnx").exists() and not leftovers(out)

    csv = tmp_path / "p.csv"
    line = one_line_error(cli(["predict", str(tiny_run), str(tiny_data), "-o", str(csv), "--compile", "off"],
                              file_limit=2_000))
    assert str(csv) in line and not csv.exists() and not leftovers(tmp_path)

    pngs = tmp_path / "cams"
    line = one_line_error(cli(["explain", str(tiny_run), str(tiny_data / "NORMAL"), "--out", str(pngs)],
                              file_limit=10_000))
    assert str(pngs) in line and not list(pngs.glob("*.png")) and not leftovers(pngs)


# --- case 5: crafted model.pt files ----------------------------------------------------------------
def _crafted(tiny_run: Path, tmp_path: Path, edit) -> Path:
    record = torch.load(tiny_run / "model.pt", weights_only=True)
    edit(record)
    path = tmp_path / "crafted" / "model.pt"
    path.parent.mkdir()
    torch.save(record, path)
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.update(classes=["a", "b", "c"], positive_index=None, class_prior=None), "do not fit"),  # vs the head
    (lambda r: r.pop("preprocessing"), "no 'preprocessing' field"),                  # a missing field
    (lambda r: r["preprocessing"].update(input_size=60000), "input size"),           # a memory bomb
    (lambda r: r.update(class_prior=[0.5]), "class_prior"),
    (lambda r: r["preprocessing"].update(mean=[0.5, "x", 0.5]), "mean"),
    (lambda r: r.update(classes=["a", "a"]), "distinct"),
])
def test_crafted_checkpoints_are_one_line(edit, message, tiny_run, tiny_data, tmp_path, capsys, monkeypatch):
    import xferlearn.models.backbones as backbones

    path = _crafted(tiny_run, tmp_path, edit)
    if message == "input size":  # refused before any network is built (22.8 GB before this check)
        monkeypatch.setattr(backbones, "create_empty", lambda *a, **k: pytest.fail("a model was built"))
    assert main(["predict", str(path), str(tiny_data / "NORMAL")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err


# --- case 11: a bounded service soak --------------------------------------------------------------
SOAK_REQUESTS, SOAK_CLIENTS, SOAK_SECONDS = 150, 8, 120  # the full 2,000-request soak: benchmarks/serve_load.py
RSS_CEILING_MB = 1500  # tiny resnet18 at 64 px: ~600 MB at rest here; the ceiling allows growth, not a leak


def _rss_mb(pid: int, field: str = "VmHWM") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def _uploads() -> list[tuple[str, bytes, str]]:
    import io

    from PIL import Image

    def encoded(image, fmt):
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        return buffer.getvalue()

    large = np.tile(np.linspace(0, 255, 2400, dtype=np.uint8), (2000, 1))  # a full-size radiograph's shape
    deep = (np.arange(2000 * 2000, dtype=np.uint32).reshape(2000, 2000) % 65536).astype(np.uint16)  # 16-bit
    return [("small.jpeg", encoded(synthetic_image(1, 3, 64), "JPEG"), "image/jpeg"),
            ("large.jpeg", encoded(Image.fromarray(large), "JPEG"), "image/jpeg"),
            ("deep.png", encoded(Image.fromarray(deep), "PNG"), "image/png")]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads resident memory from /proc")
def test_service_soak_holds_memory_under_a_ceiling(tiny_run):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "xferlearn.cli", "serve", str(tiny_run), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(url + "/health", timeout=2).raise_for_status()
                break
            except httpx.HTTPError:
                assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.3)
        uploads, started = _uploads(), time.monotonic()

        def one(i):
            name, body, kind = uploads[i % len(uploads)]
            if time.monotonic() - started > SOAK_SECONDS:
                return "timeout"
            response = httpx.post(url + "/predict", files={"file": (name, body, kind)}, timeout=60)
            return response.status_code

        with ThreadPoolExecutor(SOAK_CLIENTS) as pool:
            statuses = list(pool.map(one, range(SOAK_REQUESTS)))
        peak = _rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=20)
    assert statuses.count(200) == SOAK_REQUESTS, {s: statuses.count(s) for s in set(statuses)}
    assert peak < RSS_CEILING_MB, f"peak resident memory {peak:.0f} MB, over the {RSS_CEILING_MB} MB ceiling"


# --- case 10: one exit-code rule for files that cannot be read ------------------------------------
def test_predict_and_explain_share_one_exit_code_rule(tiny_run, tmp_path, capsys):
    from xferlearn.cli import UNREADABLE_RULE, build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    for name in ("predict", "explain"):
        assert UNREADABLE_RULE in " ".join(commands[name].format_help().split())
    bad = tmp_path / "bad.jpeg"
    bad.write_bytes(b"not an image")
    good = next((tiny_run.parent / "data" / "NORMAL").iterdir())
    assert main(["predict", str(tiny_run), str(good), str(bad)]) == 1
    assert main(["explain", str(tiny_run), str(good), str(bad), "--out", str(tmp_path / "cams")]) == 1
    assert main(["predict", str(tiny_run), str(good)]) == 0
