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


def train_two_processes_and_one(tmp_path, overrides):
    """Train the config of ``overrides`` as 2 processes x batch 2 (torchrun, into
    ``tmp_path/ddp``) and as 1 process x batch 4 (``tmp_path/one``); assert their weights
    agree within float tolerance and return the DDP network."""
    import torch
    from deeplabv2 import load_model
    from deeplabv2.config import load_config, save_config
    from deeplabv2.train import train
    cfg_path = tmp_path / "ddp.yaml"
    save_config(load_config(None, [*overrides, f"train.out_dir={tmp_path / 'ddp'}"]), cfg_path)
    code, _, stderr = run_torchrun(["train", "-c", cfg_path, "train.progress=false"], tmp_path)
    assert code == 0, stderr[-3000:]
    ddp = load_model(tmp_path / "ddp" / "model.pth")
    single = train(load_config(None, [*overrides, "data.batch_size=4",
                                      f"train.out_dir={tmp_path / 'one'}"])).model
    for k, v in single.state_dict().items():
        assert torch.allclose(v, ddp.state_dict()[k], rtol=1e-4, atol=1e-6), k
    return ddp
