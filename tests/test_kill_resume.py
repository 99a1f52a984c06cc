"""Issue 26: DAFormer's strategy (rare-class sampling and the feature distance on), HRDA and MIC
resume exactly after ``kill -9``. Each run goes through the ``deeplabv2`` command line in its
own process (``tests/crash_after.py``), is killed with nothing cleaned up, then continued with
``--resume`` in a fresh process; the resumed run's ``last.pth`` and ``model.pth`` are compared
byte for byte with those of the uninterrupted run (network, EMA teacher, ImageNet copy,
AdamW's moments, RNG state: the files hold the same bytes for the same contents), and so are
the batches, the logs and the RNG draws of every iteration run after the resume.

The in-process checks (``test_uda_train.crash_and_resume``) stop the run with an exception;
here the process dies, as the issue says: by ``os._exit`` right after an iteration (what
``kill -9`` leaves: no ``finally``, no lock released, no loader shut down), and once by a real
``SIGKILL`` from this process (the child waits after the iteration until it comes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from deeplabv2.config import load_config, save_config

from test_daformer import DAFORMER
from test_hrda_method import HRDA_TINY
from test_rcs import RCS
from test_train import TINY
from test_uda_train import TARGET
from torchrun import run_torchrun

CRASH = Path(__file__).resolve().parent / "crash_after.py"
MIC = "adapt.mic={block_size: 16}"
# 5 iterations, a checkpoint every 2: killed after 3, the resume redoes iteration 3 from the
# checkpoint of 2 and runs 4 and 5 (the warm-up of DAFORMER ends at 2, the poly runs on)
RUN = ["train.iterations=5", "train.checkpoint_every=2", "adapt.pseudo_threshold=0.2"]


def _run(folder: Path, cfg: Path, log: str, *extra, env=None, processes=1,
         wait_for_marker=None) -> int:
    """``crash_after.py train -c cfg`` in ``folder`` (1 process, or 2 under torchrun), its
    step log into ``folder / log``. With ``wait_for_marker`` (1 process) the process group is
    sent SIGKILL once the process has written the marker. Returns the exit code."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STEP_LOG": str(folder / log), **(env or {})}
    args = ["train", "-c", str(cfg), *extra]
    if processes == 2:
        code, _, err = run_torchrun(args, folder, script=CRASH, env_extra=env)
        if code != 0 and "CRASH_AFTER" not in env:
            pytest.fail(err[-3000:])
        return code
    proc = subprocess.Popen([sys.executable, str(CRASH), *args], cwd=folder, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        if wait_for_marker is not None:
            deadline = time.monotonic() + 300
            while not Path(f"{wait_for_marker}.0").exists():
                assert proc.poll() is None and time.monotonic() < deadline, \
                    proc.communicate()[1][-3000:]
                time.sleep(0.1)
            os.killpg(proc.pid, signal.SIGKILL)  # kill -9, the whole process group
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.returncode not in (0, 17, -signal.SIGKILL):
        pytest.fail(err[-3000:])
    return proc.returncode


def _steps(folder: Path, ranks: int = 1) -> list[dict]:
    """Every rank's step-log entries, in order (rank by rank)."""
    return [json.loads(line) for r in range(ranks)
            for line in (folder / f"rank{r}.jsonl").read_text().splitlines()]


def _tensors(a, b, where=""):
    """Every tensor (and plain value) of the nested checkpoint ``a`` equals ``b``'s, bit for
    bit; the first difference is named."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _tensors(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            pytest.fail(f"{where} differs: {a.dtype} {tuple(a.shape)} vs {b.dtype} "
                        f"{tuple(b.shape)}", pytrace=False)
    else:
        assert a == b, where


def kill_and_resume(tmp_path: Path, overrides: list, at: int = 3, *, sigkill: bool = False,
                    processes: int = 1) -> dict:
    """Run ``overrides`` uninterrupted (``full``), and killed after iteration ``at`` then
    resumed (``cut``), each through the command line in fresh processes; assert the two end
    equal bit for bit. Returns the uninterrupted run's ``last.pth``."""
    cfg = load_config(None, [*overrides, "train.out_dir=run"])  # one relative out_dir: the
    every = cfg.train.checkpoint_every  # configs recorded in the checkpoints are equal
    saved = at // every * every
    assert 0 < saved < at < cfg.train.iterations, "killed between two checkpoints"
    folders = {}
    for name in ("full", "cut"):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        save_config(cfg, folders[name] / "run.yaml")
    full, cut = folders["full"], folders["cut"]
    assert _run(full, full / "run.yaml", "log", processes=processes) == 0

    marker = cut / "killed" if sigkill else None
    env = {"CRASH_AFTER": str(at), **({"KILL_MARKER": str(marker)} if sigkill else {})}
    code = _run(cut, cut / "run.yaml", "log_killed", env=env, processes=processes,
                wait_for_marker=marker)
    assert code != 0
    if sigkill:
        assert code == -signal.SIGKILL
    run = cut / "run"
    # what the kill leaves: the lock, the checkpoint of `saved`, no model.pth
    assert (run / ".lock").is_file() and not (run / "model.pth").exists()
    assert torch.load(run / "last.pth", weights_only=True)["train_state"]["iteration"] == saved
    assert _run(cut, cut / "run.yaml", "log_resumed", "--resume", processes=processes) == 0
    assert not (run / ".lock").exists()

    a = torch.load(full / "run" / "last.pth", weights_only=True)
    b = torch.load(run / "last.pth", weights_only=True)
    # part by part first (a failure names the part), then the whole files
    assert a["train_state"]["iteration"] == cfg.train.iterations
    for part in ("model", "adapt_state", "optimizer_state", "rng_state", "train_state"):
        _tensors(a.get(part), b.get(part), part)
    assert (full / "run" / "last.pth").read_bytes() == (run / "last.pth").read_bytes()
    assert (full / "run" / "model.pth").read_bytes() == (run / "model.pth").read_bytes()

    # the batches, the logs and the RNG after each iteration: the killed run's up to the kill,
    # the resumed run's from the checkpoint on, are the uninterrupted run's
    done = _steps(full / "log", processes)
    killed = _steps(cut / "log_killed", processes)
    resumed = _steps(cut / "log_resumed", processes)
    assert killed == [e for e in done if e["iteration"] <= at]
    expected = [e for e in done if e["iteration"] > saved]
    assert resumed == expected
    assert len({e["images"] for e in expected if "images" in e}) > 1
    return a


@pytest.mark.slow
def test_daformer_with_rare_class_sampling_and_feature_distance_resumes_after_os_exit(
        tmp_path):
    state = kill_and_resume(tmp_path, [*TINY, *TARGET, "adapt.method=daformer", *DAFORMER,
                                       RCS, *RUN])
    modules = state["adapt_state"]["modules"]
    assert any(k.startswith("teacher.") for k in modules)
    assert any(k.startswith("imagenet.") for k in modules)
    assert state["optimizer_state"]["state"], "AdamW's moments compared"


@pytest.mark.slow
def test_daformer_with_mic_resumes_after_a_real_sigkill(tmp_path):
    kill_and_resume(tmp_path, [*TINY, *TARGET, "adapt.method=daformer", *DAFORMER, MIC, *RUN],
                    sigkill=True)


@pytest.mark.slow
def test_hrda_with_mic_resumes_after_os_exit(tmp_path):
    state = kill_and_resume(tmp_path, [*TINY, *TARGET, "adapt.method=hrda", *HRDA_TINY, RCS,
                                       MIC, *RUN])
    assert any(k.startswith("teacher.model.scale_attention.")
               for k in state["adapt_state"]["modules"])


@pytest.mark.slow
def test_torchrun_two_processes_resume_after_os_exit(tmp_path):
    """Under 2-process torchrun (gloo): HRDA with MIC and rare-class sampling, every rank
    killed after iteration 3, resumed: both ranks' batches, logs and RNG draws, and the
    checkpoint, are the uninterrupted DDP run's."""
    kill_and_resume(tmp_path, [*TINY, *TARGET, "adapt.method=hrda", *HRDA_TINY, RCS, MIC, *RUN],
                    processes=2)


def test_a_resumed_checkpoint_has_the_bytes_of_the_uninterrupted_one(tmp_path):
    """The same contents give the same ``.pth`` bytes even when they were read back from a
    checkpoint. pickle writes an object it has seen as a reference to it, by identity: the
    uninterrupted run's optimizer names its groups with the code's strings, which the config
    written before them holds too ("backbone"), a resumed run's with the strings read from
    ``last.pth``; its ``last.pth`` used to differ in bytes, not in contents."""
    from deeplabv2.checkpoint import load_checkpoint, save_checkpoint
    from deeplabv2.train import _build_model, build_optimizer
    cfg = load_config(None, [*TINY, *DAFORMER])
    torch.manual_seed(0)
    model = _build_model(cfg, 7)
    optimizer = build_optimizer(model, cfg.train)
    model(torch.randn(1, 3, 32, 32)).sum().backward()
    optimizer.step()
    config = {"model": {"backbone": "resnet"}, "note": "backbone"}
    save_checkpoint(tmp_path / "a.pth", model, optimizer, 1, ["c"] * 7, None, config)
    again = build_optimizer(model, cfg.train)
    load_checkpoint(tmp_path / "a.pth", model, again)
    assert again.param_groups[0]["name"] == "backbone"
    assert again.param_groups[0]["name"] is not optimizer.param_groups[0]["name"]
    save_checkpoint(tmp_path / "b.pth", model, again, 1, ["c"] * 7, None, config)
    assert (tmp_path / "a.pth").read_bytes() == (tmp_path / "b.pth").read_bytes()
