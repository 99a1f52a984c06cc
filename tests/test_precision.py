"""train.amp: auto and predict --precision auto: the decision rule, with the CPU and the probe
mocked (the speed itself is measured in benchmarks/, not here)."""

import pytest
import torch

import deeplabv2.precision as precision
from deeplabv2.config import ConfigError, load_config


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    monkeypatch.delenv(precision.PIN_ENV, raising=False)  # conftest pins fp32 for the others
    precision._cpu_bf16_pays.cache_clear()
    yield
    precision._cpu_bf16_pays.cache_clear()


def _cpu(monkeypatch, flags):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))


AMX = {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8"}
# native bf16 without AMX: Intel Cooper Lake (bf16 measured slower) and AMD Zen 4 (faster)
AVX512_BF16 = {"avx512f", "avx512_bf16", "avx512_vnni"}
AVX512 = {"avx512f", "avx512bw", "avx512_vnni"}  # AVX-512 without bf16 (Cascade Lake)
AVX2 = {"avx", "avx2", "fma"}


def _probe(value, calls):
    def probe():
        calls.append(value)
        return value
    return probe


@pytest.mark.parametrize("flags", [AVX512, AVX2])
def test_auto_is_fp32_without_native_bf16_and_runs_no_probe(monkeypatch, flags):
    """bf16 emulated (0.05-0.2x FP32 measured): nothing to measure."""
    _cpu(monkeypatch, flags)
    calls = []
    amp, cl, why = precision.resolve_train_amp("auto", False, torch.device("cpu"),
                                               probe=_probe(5.0, calls))
    assert (amp, cl) == ("none", False) and calls == [] and "no AMX" in why
    assert precision.resolve_inference_precision("auto", "cpu", _probe(5.0, calls))[0] == "fp32"


def test_auto_on_amx_follows_the_probe(monkeypatch):
    _cpu(monkeypatch, AMX)
    calls = []
    amp, cl, why = precision.resolve_train_amp("auto", False, "cpu", probe=_probe(2.4, calls))
    assert (amp, cl) == ("bf16", True) and "2.4x" in why
    precision._cpu_bf16_pays.cache_clear()
    amp, cl, why = precision.resolve_train_amp("auto", True, "cpu", probe=_probe(1.1, calls))
    assert (amp, cl) == ("none", True) and "1.10x" in why  # channels_last kept as configured
    assert calls == [2.4, 1.1]
    assert precision.resolve_inference_precision("auto", "cpu", _probe(1.1, calls))[0] == "fp32"


def test_auto_on_avx512_bf16_without_amx_follows_the_probe(monkeypatch):
    """Native bf16 without AMX is measured, not refused: an AMD EPYC Zen 4 (bf16 step 1.97x
    FP32, the probe 1.75-1.99x) trains and predicts in bf16; an Intel Xeon without AMX (step
    0.94x) stays in FP32. Both say why."""
    _cpu(monkeypatch, AVX512_BF16)
    calls = []
    amp, cl, why = precision.resolve_train_amp("auto", False, "cpu", probe=_probe(1.9, calls))
    assert (amp, cl) == ("bf16", True)
    assert why == "train.amp=auto: bf16 autocast + channels-last (AVX512-BF16 CPU, bf16 probe " \
                  "1.9x FP32)"
    chosen, why = precision.resolve_inference_precision("auto", "cpu", _probe(1.7, calls))
    assert chosen == "bf16" and why == "--precision auto: bf16 (AVX512-BF16 CPU, bf16 probe " \
                                       "1.7x FP32)"
    precision._cpu_bf16_pays.cache_clear()
    amp, cl, why = precision.resolve_train_amp("auto", False, "cpu", probe=_probe(0.94, calls))
    assert (amp, cl) == ("none", False)
    assert why.startswith("train.amp=auto: FP32 (AVX512-BF16 CPU, but the bf16 probe measured "
                          "only 0.94x FP32 now")
    chosen, why = precision.resolve_inference_precision("auto", "cpu", _probe(0.77, calls))
    assert chosen == "fp32" and "0.77x" in why
    assert calls == [1.9, 1.7, 0.94, 0.77]


def test_training_and_inference_each_run_their_own_probe(monkeypatch):
    """``train.amp: auto`` asks the training-step probe, ``--precision auto`` the inference
    one (inference has FP32 speed-ups of its own), each once per process, and the reason
    names the probe that decided."""
    _cpu(monkeypatch, AVX512_BF16)
    calls = []
    for name, value, label in [("bf16_train_speedup", 1.9, "training-step"),
                               ("bf16_inference_speedup", 1.2, "inference")]:
        probe = _probe(value, calls)
        probe.label = label
        monkeypatch.setattr(precision, name, probe)
    for _ in range(2):
        assert precision.resolve_train_amp("auto", False, "cpu")[2].endswith(
            "(AVX512-BF16 CPU, bf16 training-step probe 1.9x FP32)")
        chosen, why = precision.resolve_inference_precision("auto", "cpu")
        assert chosen == "fp32" and "the bf16 inference probe measured only 1.20x" in why
    assert calls == [1.9, 1.2]


def test_the_probe_runs_once_per_process(monkeypatch):
    _cpu(monkeypatch, AMX)
    calls = []
    probe = _probe(3.0, calls)
    for _ in range(3):
        assert precision.resolve_train_amp("auto", False, "cpu", probe=probe)[0] == "bf16"
    assert precision.resolve_inference_precision("auto", "cpu", probe)[0] == "bf16"
    assert calls == [3.0]


def test_explicit_choices_are_kept(monkeypatch):
    _cpu(monkeypatch, AMX)
    calls = []
    for amp in ("none", "bf16", "fp16"):
        assert precision.resolve_train_amp(amp, False, "cpu", _probe(3.0, calls))[:2] == \
            (amp, False)
    assert precision.resolve_inference_precision("fp32", "cpu", _probe(3.0, calls))[0] == "fp32"
    assert calls == []


def test_gpu_rule(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision.resolve_train_amp("auto", False, torch.device("cuda"),
                                       _probe(0.5, calls))[:2] == ("bf16", True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert precision.resolve_train_amp("auto", False, torch.device("cuda"),
                                       _probe(5.0, calls))[:2] == ("none", False)
    assert calls == []


def test_the_probe_is_fp32_over_bf16_best_of_the_timed_rounds(monkeypatch):
    """The probe's steps run for real, each on a clock of the test's own that its autocast
    moves by a scripted time: the result is FP32's best time over bf16's (so > 1 means bf16
    pays), the warm-up round left out. Counting the warm-up would give 4, inverting the ratio
    0.5, means instead of minima 1."""
    class Clock:
        now = 0.0

        def perf_counter(self):
            return self.now

    clock = Clock()
    seconds = {False: [0.5, 3.0, 2.0], True: [0.125, 1.0, 4.0]}  # warm-up, then 2 rounds
    real_autocast = torch.autocast

    def autocast(device_type, *args, enabled=True, **kwargs):
        assert torch.get_num_threads() == 1  # one thread reads a core's speed steadily
        clock.now += seconds[enabled].pop(0)
        return real_autocast(device_type, *args, enabled=enabled, **kwargs)

    monkeypatch.setattr(precision, "time", clock)
    monkeypatch.setattr(torch, "autocast", autocast)
    with _caller_threads(2):
        assert precision.bf16_train_speedup(channels=8, size=8, repeats=2) == 2.0
        assert torch.get_num_threads() == 2
    assert seconds == {False: [], True: []}  # one autocast per step: every step was run


def test_the_inference_probe_times_the_inference_networks(monkeypatch):
    """The inference probe prepares the network as ``predict`` does, once per precision
    (``optimize_for_inference``), and times calls of it without autograd on a clock of the
    test's own that each call moves by a scripted time: FP32's best over bf16's, the warm-up
    round left out (with it: 0.3/0.1 = 3; means of the rest: 1.9)."""
    from deeplabv2.deploy import fast

    class Clock:
        now = 0.0

        def perf_counter(self):
            return self.now

    clock = Clock()
    seconds = {"fp32": [0.3, 0.8, 0.6, 0.9], "bf16": [0.1, 0.5, 0.4, 0.3]}
    real = fast.optimize_for_inference
    prepared = []

    def optimize(model, precision="fp32", **kwargs):
        net = real(model, precision=precision, **kwargs)
        prepared.append((precision, kwargs))

        def run(x):
            assert not torch.is_grad_enabled() and torch.get_num_threads() == 1
            clock.now += seconds[precision].pop(0)
            return net(x)
        return run

    monkeypatch.setattr(precision, "PROBE_MODEL", {**precision.PROBE_MODEL, "width": 8})
    monkeypatch.setattr(precision, "time", clock)
    monkeypatch.setattr(fast, "optimize_for_inference", optimize)
    with _caller_threads(2):
        assert precision.bf16_inference_speedup(size=33, repeats=3) == pytest.approx(2.0)
        assert torch.get_num_threads() == 2  # the caller's threads are back
    assert prepared == [("fp32", {}), ("bf16", {})]  # the defaults predict runs with
    assert seconds == {"fp32": [], "bf16": []}  # every timed call ran


_caller_threads = precision._threads  # the caller's thread count, restored after


def test_the_inference_probe_runs_and_leaves_the_random_state(monkeypatch):
    monkeypatch.setattr(precision, "PROBE_MODEL", {**precision.PROBE_MODEL, "width": 8})
    state = torch.get_rng_state()
    assert precision.bf16_inference_speedup(size=33, repeats=1) > 0
    assert torch.equal(torch.get_rng_state(), state) and torch.is_grad_enabled()


def test_the_probe_runs_inside_no_grad():
    """The probe is a training step: asked first from inference code under ``no_grad`` (as
    ``--precision int8`` does while the bench's modes are prepared), it still measures."""
    with torch.no_grad():
        assert precision.bf16_train_speedup(channels=8, size=8, repeats=1) > 0
        assert not torch.is_grad_enabled()


def test_amp_auto_is_the_default_and_validated():
    assert load_config(None).train.amp == "auto"
    with pytest.raises(ConfigError, match="train.amp"):
        load_config(None, ["train.amp=fast"])


def test_training_records_the_choice(monkeypatch, tmp_path):
    """A run with amp: auto trains in what the rule picked and writes it to config.yaml."""
    import yaml

    from deeplabv2.train import train
    monkeypatch.setattr(precision, "bf16_pays", lambda device, probe=None: (True, "mocked"))
    cfg = load_config("demo", ["train.iterations=1", f"train.out_dir={tmp_path}",
                               "data.options={num_samples: 4, size: [48, 64]}",
                               "data.crop_size=[48, 64]", "data.batch_size=2",
                               "data.num_workers=0", "train.tensorboard=false",
                               "train.progress=false", "train.channels_last=false"])
    result = train(cfg)
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]
    assert saved["amp"] == "bf16" and saved["channels_last"] is True
    assert result.iterations == 1


def test_the_environment_pins_the_choice(monkeypatch):
    _cpu(monkeypatch, AMX)
    calls = []
    monkeypatch.setenv(precision.PIN_ENV, "fp32")
    assert precision.resolve_train_amp("auto", False, "cpu", _probe(3.0, calls))[0] == "none"
    monkeypatch.setenv(precision.PIN_ENV, "bf16")
    assert precision.resolve_inference_precision("auto", "cpu", _probe(3.0, calls))[0] == "bf16"
    assert calls == []
    monkeypatch.setenv(precision.PIN_ENV, "fast")
    with pytest.raises(ValueError, match=precision.PIN_ENV):
        precision.resolve_train_amp("auto", False, "cpu")


def _tiny_train_config(tmp_path, *extra):
    return load_config("demo", ["train.iterations=1", f"train.out_dir={tmp_path}",
                                "data.options={num_samples: 4, size: [48, 64]}",
                                "data.crop_size=[48, 64]", "data.batch_size=2",
                                "data.num_workers=0", "train.tensorboard=false",
                                "train.channels_last=false", *extra])


def test_training_prints_what_auto_chose_and_why(monkeypatch, tmp_path, capsys):
    """On a native-bf16 CPU without AMX whose training probe pays, the run trains in bf16 and
    says so, once, with the measurement; a single process never blames another rank."""
    from deeplabv2.train import train
    _cpu(monkeypatch, AVX512_BF16)
    probe = _probe(1.9, [])
    probe.label = "training-step"
    monkeypatch.setattr(precision, "bf16_train_speedup", probe)
    train(_tiny_train_config(tmp_path, "train.progress=true"))
    out = capsys.readouterr().out
    line = "train.amp=auto: bf16 autocast + channels-last (AVX512-BF16 CPU, bf16 training-step " \
           "probe 1.9x FP32)"
    assert out.count(line) == 1 and "another rank" not in out


@pytest.mark.parametrize("mine, others, expected, blamed", [
    (False, None, "none", False),  # one process, FP32 by its own probe: nobody else to blame
    (True, None, "bf16", False),
    (True, [1.0], "bf16", False),  # two ranks, both bf16
    (True, [0.0], "none", True),   # the other rank measured FP32: FP32 on both, said
    (False, [1.0], "none", False),  # this rank measured FP32 itself: its own reason says so
    (True, [1.0, 0.0], "none", True)])
def test_another_rank_is_named_only_where_there_is_one(monkeypatch, tmp_path, mine, others,
                                                        expected, blamed):
    """``train.amp: auto`` runs as the slowest rank's probe says. "another rank measured FP32
    faster" only where another rank exists and it overruled this one's bf16."""
    from deeplabv2 import train as train_module
    from deeplabv2.utils import distributed
    monkeypatch.setattr(precision, "bf16_pays",
                        lambda device, probe=None: (mine, "mocked"))
    if others is not None:  # the other ranks' votes, as all_reduce would add them
        monkeypatch.setattr(distributed, "all_reduce_sum",
                            lambda t: t + torch.tensor([sum(others), len(others)]))
    cfg, why = train_module._resolve_amp(_tiny_train_config(tmp_path), torch.device("cpu"))
    assert cfg.train.amp == expected
    assert ("another rank measured FP32 faster" in why) == blamed
