"""``deeplabv2`` as from the command line, but every process dies (``os._exit``, no clean-up,
as under ``kill -9``) right after iteration ``$CRASH_AFTER`` and its checkpoint: the fault
injected by test_failures.py's DDP resume test."""

import os
import sys

from deeplabv2 import train as train_module
from deeplabv2.cli import main

CRASH_AFTER = int(os.environ["CRASH_AFTER"])
_train = train_module.train


def crashing_train(cfg, resume=None, on_iteration=None, **kw):
    def hook(iteration, logs):
        if iteration == CRASH_AFTER:
            os._exit(17)
    return _train(cfg, resume, hook, **kw)


train_module.train = crashing_train
sys.exit(main())
