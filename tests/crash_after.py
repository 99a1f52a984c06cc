"""``deeplabv2`` as from the command line, with the faults the resume tests inject, each set by
an environment variable (test_failures.py's DDP resume test, test_kill_resume.py):

* ``CRASH_AFTER=N``: every process dies right after iteration N (and its checkpoint, when one
  is due) by ``os._exit``: no clean-up, as under ``kill -9``. With ``KILL_MARKER=FILE`` it
  instead writes ``FILE.<rank>`` and waits there until the test sends it a real ``SIGKILL``.
* ``STEP_LOG=FOLDER``: each process appends to ``FOLDER/rank<R>.jsonl``, for every micro-step,
  the SHA-256 of its batch (source images and labels, target images) and, after every
  iteration, the iteration's logs (loss, learning rate, the method's terms) and the SHA-256 of
  the global RNG state its draws (ClassMix, jitter, HRDA's box, MIC's mask) left: what an
  exact resume must repeat.
"""

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from deeplabv2 import train as train_module
from deeplabv2.cli import main

CRASH_AFTER = int(os.environ.get("CRASH_AFTER", "0"))
KILL_MARKER = os.environ.get("KILL_MARKER")
STEP_LOG = os.environ.get("STEP_LOG")
RANK = int(os.environ.get("RANK", "0"))
_train, _next_step = train_module.train, train_module._next_step


def sha(t) -> str | None:
    return None if t is None else hashlib.sha256(t.detach().cpu().contiguous()
                                                 .numpy().tobytes()).hexdigest()


def record(entry: dict) -> None:
    folder = Path(STEP_LOG)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"rank{RANK}.jsonl", "a") as f:  # a line survives a kill after it
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def logging_next_step(run, iteration, signals):
    step = _next_step(run, iteration, signals)
    record({"iteration": iteration + 1, "images": sha(step.images), "labels": sha(step.labels),
            "target": sha(step.target)})
    return step


def crashing_train(cfg, resume=None, on_iteration=None, **kw):
    def hook(iteration, logs):
        if STEP_LOG:
            record({"iteration": iteration, "logs": logs, "rng": sha(torch.get_rng_state())})
        if iteration == CRASH_AFTER:
            if KILL_MARKER:
                Path(f"{KILL_MARKER}.{RANK}").write_text(str(os.getpid()))
                while True:  # until the SIGKILL
                    time.sleep(1)
            os._exit(17)
    return _train(cfg, resume, hook, **kw)


train_module.train = crashing_train
if STEP_LOG:
    train_module._next_step = logging_next_step
sys.exit(main())
