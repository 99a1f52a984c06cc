"""Launch ``torchrun --nproc_per_node=2 --standalone`` for the DDP tests (gloo on the CPU)."""

import os
import signal
import subprocess
import sys


def run_torchrun(args, cwd, script=None, env_extra=None, timeout=300):
    """Run ``deeplabv2 ARGS`` (or ``script``) as 2 processes; return ``(code, stdout, stderr)``.
    It runs in its own process group, so that a hang kills torchrun *and* its workers."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    target = [str(script)] if script else ["-m", "deeplabv2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           *target, *map(str, args)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, cwd=cwd)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc.returncode, out, err
