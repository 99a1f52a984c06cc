"""BN and head as the released UDA codes run them (issue 25): ``model.bn: batch`` (BatchNorm2d
with frozen affine, batch statistics in training, running averages updated by every training
forward and applied at test time), the two-branch AdaptSegNet/DACS head made trainable, the
DACS teacher in batch mode, the ``frozen_bn``/``bn`` keys old and new.

Expected values are computed here from the definitions the released code relies on (PyTorch's
``nn.BatchNorm2d``: ``running = (1 - m) * running + m * batch``, ``m = 0.1``, the variance
unbiased; ``y = (x - mean) / sqrt(var + eps) * w + b`` with the biased batch variance in
training), with plain tensor ops on the inputs each BN received."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deeplabv2 import build_model, load_model, load_weights, save_weights
from deeplabv2.adapt.methods import Step, build_method
from deeplabv2.adapt.mix import EMATeacher
from deeplabv2.checkpoint import changed_settings
from deeplabv2.config import ConfigError, load_config, save_config
from deeplabv2.deploy.fast import fold_batchnorm
from deeplabv2.model import ASPP, FrozenBatchNorm2d
from deeplabv2.train import segmentation_loss, train

from test_train import TINY
from test_uda_train import TARGET
from test_weights import caffe_keys, narrow, randomized
from torchrun import run_torchrun

TINY_MODEL = {"backbone": "resnet", "blocks": [1, 1, 1, 1], "width": 8, "num_classes": 5}
MOMENTUM, EPS = 0.1, 1e-5


def batch_model(seed=0, **kw):
    """The tiny network in batch mode with random statistics and affine parameters (so that an
    update or a skipped one shows)."""
    torch.manual_seed(seed)
    model = build_model({**TINY_MODEL, "bn": "batch", **kw})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    assert len(bns(model)) == 17  # stem, 4 x (3 + downsample), 1 block per stage
    return model


def bns(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


class Recorder:
    """Every input and output of every BatchNorm2d of ``model``, per call."""

    def __init__(self, model):
        self.calls = {name: [] for name, _ in bns(model)}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in bns(model)]

    def _hook(self, name):
        def hook(module, inputs, output):
            self.calls[name].append((inputs[0].detach().clone(), output.detach().clone()))
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def channel_stats(x):
    """Per-channel mean, biased and unbiased variance of an ``(N, C, H, W)`` tensor, written out."""
    c = x.shape[1]
    flat = x.transpose(0, 1).reshape(c, -1).double()
    n = flat.shape[1]
    mean = flat.sum(1) / n
    ss = ((flat - mean[:, None]) ** 2).sum(1)
    return mean, ss / n, ss / (n - 1)


def normalised(x, mean, var, weight, bias):
    shape = (1, -1, 1, 1)
    return ((x.double() - mean.view(shape)) / (var.view(shape) + EPS).sqrt()
            * weight.double().view(shape) + bias.double().view(shape))


def tiny_step(model, seed=1, size=33):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, size, size, generator=g) * 40
    target = torch.randn(2, 3, size, size, generator=g) * 40 + 10
    labels = torch.randint(0, model.num_classes, (2, size, size), generator=g)
    return Step(net=model, model=model, images=images, labels=labels, target=target,
                iteration=0, seg_loss=lambda s, y: segmentation_loss(s, y, "stride8",
                                                                     model.alignment))


def adapt_settings(method, *more):
    return load_config(None, [*TINY, *TARGET, f"adapt.method={method}", "model.bn=batch",
                              *more]).adapt


# -- BN statistics through the methods' real passes -------------------------------------------
def test_adaptsegnet_iteration_updates_running_stats_from_source_then_target():
    """One AdaptSegNet iteration as the loop runs it (source pass, target pass, SGD step): each
    BN normalised by its batch's statistics, its running averages moved by the source batch and
    then by the target batch, its affine parameters untouched by the step."""
    model = batch_model().train()
    before = {name: (m.running_mean.clone(), m.running_var.clone(), m.weight.clone(),
                     m.bias.clone()) for name, m in bns(model)}
    method = build_method(adapt_settings("adaptsegnet"), model)
    step = tiny_step(model)
    rec = Recorder(model)
    optimizer = torch.optim.SGD(model.param_groups(0.01, 5e-4), lr=0.01, momentum=0.9)
    for k in range(method.passes(0)):
        method.loss(step, k).backward()
    method.discriminator_backward(1)
    rec.remove()
    for name, m in bns(model):
        (x_src, y_src), (x_tgt, y_tgt) = rec.calls[name]
        mean0, var0, weight, bias = before[name]
        expected_mean, expected_var = mean0.double(), var0.double()
        for x, y in ((x_src, y_src), (x_tgt, y_tgt)):
            mean, biased, unbiased = channel_stats(x)
            torch.testing.assert_close(y.double(), normalised(x, mean, biased, weight, bias),
                                       rtol=1e-4, atol=1e-4)
            expected_mean = (1 - MOMENTUM) * expected_mean + MOMENTUM * mean
            expected_var = (1 - MOMENTUM) * expected_var + MOMENTUM * unbiased
        torch.testing.assert_close(m.running_mean.double(), expected_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.running_var.double(), expected_var, rtol=1e-5, atol=1e-6)
        assert int(m.num_batches_tracked) == 2
    # the stem's input is the image batch itself: its statistics from the conv, independently
    stem = model.backbone
    for x, (recorded, _) in zip((step.images, step.target), rec.calls["backbone.bn1"]):
        conv = F.conv2d(x, stem.conv1.weight, stride=2, padding=3)
        torch.testing.assert_close(recorded, conv, rtol=1e-5, atol=1e-4)
    stats = {name: (m.running_mean.clone(), m.running_var.clone()) for name, m in bns(model)}
    grouped = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for name, m in bns(model):
        assert m.weight.grad is None and m.bias.grad is None, name
        assert id(m.weight) not in grouped and id(m.bias) not in grouped, name
    optimizer.step()
    for name, m in bns(model):
        assert torch.equal(m.weight, before[name][2]) and torch.equal(m.bias, before[name][3])
        assert torch.equal(m.running_mean, stats[name][0])
        assert torch.equal(m.running_var, stats[name][1])


def test_eval_mode_applies_the_running_statistics():
    model = batch_model().eval()
    saved = {name: (m.running_mean.clone(), m.running_var.clone()) for name, m in bns(model)}
    rec = Recorder(model)
    with torch.no_grad():
        model(torch.randn(1, 3, 41, 41) * 30)
    rec.remove()
    for name, m in bns(model):
        (x, y), = rec.calls[name]
        expected = normalised(x, m.running_mean.double(), m.running_var.double(), m.weight,
                              m.bias)
        torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)
        assert torch.equal(m.running_mean, saved[name][0]), "eval must not update statistics"
        assert torch.equal(m.running_var, saved[name][1])


@pytest.mark.parametrize("method", ["advent", "minent", "fda"])
def test_every_pass_of_the_other_methods_moves_the_statistics(method):
    """ADVENT and FDA (entropy pass from fda_ent_start=1): source then target forward, each a
    training forward of the network: two updates of every running mean."""
    model = batch_model().train()
    bn = model.backbone.bn1
    m0 = bn.running_mean.clone().double()
    m = build_method(adapt_settings(method), model)
    step = tiny_step(model)
    step.iteration = 5
    rec = Recorder(model)
    for k in range(m.passes(5)):
        m.loss(step, k).backward()
    rec.remove()
    inputs = [x for x, _ in rec.calls["backbone.bn1"]]
    assert len(inputs) == 2
    expected = m0
    for x in inputs:
        expected = (1 - MOMENTUM) * expected + MOMENTUM * channel_stats(x)[0]
    torch.testing.assert_close(bn.running_mean.double(), expected, rtol=1e-5, atol=1e-6)


def test_dacs_teacher_in_batch_mode_predicts_with_batch_statistics_and_averages_parameters():
    """DACS trainUDA.py: the EMA model is in train() mode when it labels the target, and
    update_ema_variables averages parameters() only: the teacher's buffers follow its own
    forwards, never the student's."""
    model = batch_model(head_mode="adaptsegnet").train()
    method = build_method(adapt_settings("dacs"), model)
    teacher = method.teacher.model
    assert method.teacher.batch_stats and teacher.training
    method.eval()
    method.train()  # the loop's and the memory probe's mode changes leave it as it is
    assert teacher.training
    t0 = {name: m.running_mean.clone().double() for name, m in bns(teacher)}
    step = tiny_step(model)
    rec = Recorder(teacher)
    method.loss(step, 0).backward()
    method.loss(step, 1).backward()
    rec.remove()
    for name, m in bns(teacher):
        (x, y), = rec.calls[name]
        mean, biased, _ = channel_stats(x)
        torch.testing.assert_close(y.double(), normalised(x, mean, biased, m.weight, m.bias),
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(m.running_mean.double(),
                                   (1 - MOMENTUM) * t0[name] + MOMENTUM * mean,
                                   rtol=1e-5, atol=1e-6)
    # the student's step, then the EMA at iteration 1 (alpha = min(1 - 1/2, 0.99) = 0.5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    t_params = {n: p.clone() for n, p in teacher.named_parameters()}
    t_buffers = {n: b.clone() for n, b in teacher.named_buffers()}
    method.after_step(model, 1)
    student = dict(model.named_parameters())
    for n, p in teacher.named_parameters():
        torch.testing.assert_close(p, 0.5 * t_params[n] + 0.5 * student[n])
    for n, b in teacher.named_buffers():
        assert torch.equal(b, t_buffers[n]), f"{n} must not be copied from the student"
    assert any(not torch.equal(b, dict(model.named_buffers())[n])
               for n, b in teacher.named_buffers())


def test_frozen_and_trainable_bn_teachers_are_unchanged():
    for config in ({**TINY_MODEL}, {**TINY_MODEL, "frozen_bn": False}):
        student = build_model(config)
        teacher = EMATeacher(student, 0.99)
        assert not teacher.batch_stats and not teacher.model.training
        teacher.train()
        assert not teacher.model.training
        with torch.no_grad():
            for b in student.buffers():
                if b.is_floating_point():
                    b.add_(1.0)
        teacher.update(student, 3)
        for t, s in zip(teacher.model.buffers(), student.buffers()):
            assert torch.equal(t, s)


def test_training_loop_keeps_train_mode_after_validation(tmp_path):
    """Validation switches the network to eval() and back: with validation after every
    iteration, the running statistics are those of a run validated only at the end (a network
    left in eval mode would stop updating them and normalise by them)."""
    common = [*TINY, *TARGET, "adapt.method=adaptsegnet", "model.bn=batch", "train.iterations=2",
              "train.checkpoint_every=2", "data.scale_range=[1, 1]"]
    every = train(load_config(None, [*common, "train.val_every=1",
                                     f"train.out_dir={tmp_path / 'a'}"])).model
    end = train(load_config(None, [*common, f"train.out_dir={tmp_path / 'b'}"])).model
    first = build_model({**dict(end.config)})
    for k, v in end.state_dict().items():
        assert torch.equal(v, every.state_dict()[k]), k
    assert int(end.backbone.bn1.num_batches_tracked) == 4  # 2 iterations x (source + target)
    loaded = load_model(tmp_path / "b" / "model.pth")
    assert isinstance(loaded.backbone.bn1, nn.BatchNorm2d)
    assert not loaded.backbone.bn1.weight.requires_grad
    assert torch.equal(loaded.backbone.bn1.running_mean, end.backbone.bn1.running_mean)
    assert not torch.equal(first.backbone.bn1.running_mean, end.backbone.bn1.running_mean)


# -- the two-branch head ----------------------------------------------------------------------
def test_two_branch_head_is_branches_0_and_1_and_only_they_learn():
    torch.manual_seed(0)
    head = ASPP(16, 5, head_mode="adaptsegnet").train()
    with torch.no_grad():
        for conv in head.convs:
            conv.bias.normal_()
    x = torch.randn(2, 16, 29, 31, requires_grad=True)
    out = head(x)
    c = head.convs
    expected = (F.conv2d(x, c[0].weight, c[0].bias, padding=6, dilation=6)
                + F.conv2d(x, c[1].weight, c[1].bias, padding=12, dilation=12))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    for conv in c[:2]:
        assert conv.weight.requires_grad and conv.weight.grad.abs().sum() > 0
        assert conv.bias.grad is not None
    for conv in c[2:]:
        assert not conv.weight.requires_grad and not conv.bias.requires_grad
        assert conv.weight.grad is None and conv.bias.grad is None
    full = ASPP(16, 5)
    assert all(p.requires_grad for p in full.parameters())


def test_two_branch_head_in_the_optimizer_and_the_state_dict(tmp_path):
    """Branches 2-3 of the main and the layer3 head: in the state dict (and the checkpoint), in
    no parameter group, unchanged by SGD with weight decay (the released SGD skips them, their
    grad being None)."""
    model = build_model({**TINY_MODEL, "bn": "batch", "head_mode": "adaptsegnet",
                         "aux_head": True})
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = {names[id(p)] for g in model.param_groups(0.01) for p in g["params"]}
    for head in ("head", "aux_head"):
        for i in (2, 3):
            assert f"{head}.convs.{i}.weight" in model.state_dict()
            assert f"{head}.convs.{i}.weight" not in grouped
        assert {f"{head}.convs.0.weight", f"{head}.convs.1.bias"} <= grouped
    frozen = {n: p.clone() for n, p in model.named_parameters() if ".convs.2." in n
              or ".convs.3." in n}
    opt = torch.optim.SGD(model.param_groups(0.01, 5e-4), lr=0.01, momentum=0.9)
    scores, aux = model(torch.randn(2, 3, 33, 33), upsample=False, aux=True)
    (scores.square().mean() + aux.square().mean()).backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    save_weights(model, tmp_path / "m.pth")
    again = load_model(tmp_path / "m.pth")
    assert again.config["head_mode"] == "adaptsegnet"
    assert not again.head.convs[3].weight.requires_grad
    assert torch.equal(again.head.convs[3].weight, model.head.convs[3].weight)


# -- config keys, checkpoints, init files, folding -------------------------------------------
def test_bn_config_keys_old_and_new(tmp_path):
    assert load_config(None, TINY).model.bn == "frozen"
    assert load_config(None, [*TINY, "model.frozen_bn=true"]).model.bn == "frozen"
    assert load_config(None, [*TINY, "model.frozen_bn=false"]).model.bn == "train"
    cfg = load_config(None, [*TINY, "model.bn=batch"])
    assert (cfg.model.bn, cfg.model.frozen_bn) == ("batch", None)
    assert load_config(None, [*TINY, "model.bn=train", "model.frozen_bn=false"]).model.bn == \
        "train"
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(str(tmp_path / "c.yaml"))
    assert again.to_dict() == cfg.to_dict()
    # a saved config holds bn alone, so an override of it is no contradiction
    old = load_config(None, [*TINY, "model.frozen_bn=false"])
    save_config(old, tmp_path / "old.yaml")
    assert load_config(str(tmp_path / "old.yaml"), ["model.bn=batch"]).model.bn == "batch"
    with pytest.raises(ConfigError, match=r"model\.bn='batch' contradicts model\.frozen_bn=True"):
        load_config(None, [*TINY, "model.bn=batch", "model.frozen_bn=true"])
    with pytest.raises(ConfigError, match=r"model\.bn='trained'; valid values: frozen, batch, "
                                          r"train"):
        load_config(None, [*TINY, "model.bn=trained"])
    with pytest.raises(ConfigError, match="model.frozen_bn must be true or false"):
        load_config(None, [*TINY, "model.frozen_bn=maybe"])


def test_model_config_dict_old_and_new():
    for config, kind, trainable in (({}, FrozenBatchNorm2d, False),
                                    ({"frozen_bn": True}, FrozenBatchNorm2d, False),
                                    ({"frozen_bn": False}, nn.BatchNorm2d, True),
                                    ({"bn": "train"}, nn.BatchNorm2d, True),
                                    ({"bn": "batch"}, nn.BatchNorm2d, False)):
        model = build_model({**TINY_MODEL, **config})
        bn1 = model.backbone.bn1
        assert type(bn1) is kind and bn1.weight.requires_grad is trainable, config
        assert all(type(m) is kind for m in model.backbone.modules()
                   if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)))
        if kind is nn.BatchNorm2d:
            assert (bn1.momentum, bn1.eps, bn1.affine) == (MOMENTUM, EPS, True)
        rebuilt = build_model(model.config)  # what a checkpoint records rebuilds the same
        assert type(rebuilt.backbone.bn1) is kind
        assert rebuilt.backbone.bn1.weight.requires_grad is trainable
    # the two old modes record frozen_bn, as every checkpoint before bn existed
    assert build_model(TINY_MODEL).config["frozen_bn"] is True and \
        "bn" not in build_model(TINY_MODEL).config
    assert build_model({**TINY_MODEL, "bn": "train"}).config["frozen_bn"] is False
    assert build_model({**TINY_MODEL, "bn": "batch"}).config["bn"] == "batch"
    with pytest.raises(ValueError, match="bn='batch' contradicts frozen_bn=True"):
        build_model({**TINY_MODEL, "bn": "batch", "frozen_bn": True})
    with pytest.raises(ValueError, match="does not apply to the vgg16"):
        build_model({"backbone": "vgg16", "num_classes": 5, "bn": "batch"})


def test_old_format_checkpoint_still_loads(tmp_path):
    """A checkpoint written before model.bn (its model_config has frozen_bn) loads unchanged;
    a batch-mode one rebuilds batch mode with its running statistics."""
    for frozen, kind in ((True, FrozenBatchNorm2d), (False, nn.BatchNorm2d)):
        model = build_model({**TINY_MODEL, "frozen_bn": frozen})
        model.config = {"backbone": "resnet", "blocks": [1, 1, 1, 1], "width": 8,
                        "num_classes": 5, "atrous_rates": [6, 12, 18, 24], "frozen_bn": frozen}
        save_weights(model, tmp_path / f"old_{frozen}.pth")
        raw = torch.load(tmp_path / f"old_{frozen}.pth", weights_only=True)
        assert "bn" not in raw["model_config"]
        loaded = load_model(tmp_path / f"old_{frozen}.pth")
        assert type(loaded.backbone.bn1) is kind
        assert loaded.backbone.bn1.weight.requires_grad is (not frozen)
    model = batch_model()
    model(torch.randn(2, 3, 33, 33))  # num_batches_tracked 1, statistics moved
    save_weights(model, tmp_path / "batch.pth")
    loaded = load_model(tmp_path / "batch.pth")
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert not loaded.backbone.bn1.weight.requires_grad


def test_resume_compares_old_frozen_bn_with_new_bn():
    old = {"model": {"frozen_bn": True, "head_mode": "aspp"}}
    assert changed_settings(old, {"model": {"bn": "frozen", "frozen_bn": None,
                                            "head_mode": "aspp"}}) == []
    assert changed_settings(old, {"model": {"bn": "batch", "head_mode": "aspp"}}) == \
        ["model.bn 'frozen' -> 'batch'"]
    assert changed_settings({"model": {"frozen_bn": False}}, {"model": {"bn": "train"}}) == []


def test_deeplab_init_file_loads_strictly_into_batch_mode(tmp_path):
    """DeepLab init files hold running_mean/var but no num_batches_tracked (Caffe BN): they
    load strictly, every statistic in place."""
    source = randomized(narrow())
    torch.save(caffe_keys(source), tmp_path / "init.pth")
    model = narrow(bn="batch")
    report = load_weights(model, tmp_path / "init.pth")
    assert report.layout == "deeplab_caffe"
    assert any(k.endswith("num_batches_tracked") for k in report.not_in_file)
    assert torch.equal(model.backbone.layer3[7].bn2.running_var,
                       source.backbone.layer3[7].bn2.running_var)
    assert torch.equal(model.backbone.bn1.weight, source.backbone.bn1.weight)
    assert not model.backbone.bn1.weight.requires_grad


def test_batch_mode_folds_its_running_statistics():
    model = batch_model().eval()
    x = torch.randn(1, 3, 41, 41) * 30
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,head", [("adaptsegnet", "adaptsegnet"), ("advent", "aspp"),
                                       ("fda", "aspp"), ("dacs", "adaptsegnet")])
def test_adaptation_configs_run_as_released(name, head):
    for source in ("gta5", "synthia"):
        cfg = load_config(f"{source}_to_cityscapes_{name}")
        assert (cfg.model.bn, cfg.model.head_mode, cfg.train.amp) == ("batch", head, "none")
    assert load_config("cityscapes").model.bn == "frozen"
    assert load_config("voc12_aug").model.bn == "frozen"


# -- DDP -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_torchrun_two_processes_batch_mode_replicas_agree(tmp_path):
    """DACS in batch mode with the two-branch head as 2 gloo processes: each rank normalises by
    its own batch, DDP keeps the network's replicas identical (rank 0's running statistics
    broadcast), the teachers' statistics are given rank 0's too, and no parameter is unused."""
    cfg_path = tmp_path / "bn.yaml"
    save_config(load_config(None, [*TINY, *TARGET, "adapt.method=dacs", "model.bn=batch",
                                   "model.head_mode=adaptsegnet", "train.iterations=2",
                                   "train.checkpoint_every=2", "data.scale_range=[1, 1]",
                                   f"train.out_dir={tmp_path / 'run'}"]), cfg_path)
    code, _, stderr = run_torchrun(["train", "-c", cfg_path], tmp_path)
    assert code == 0, stderr[-3000:]
    for name in ("replicas.json", "replicas_adapt.json"):
        digests = json.loads((tmp_path / "run" / name).read_text())
        assert digests["world_size"] == 2 and digests["sha256"][0] == digests["sha256"][1]
    model = load_model(tmp_path / "run" / "model.pth")
    assert model.config["bn"] == "batch"
    assert int(model.backbone.bn1.num_batches_tracked) == 4  # rank 0's: 2 x (source + mixed)


def test_info_and_hub_know_batch_mode():
    """``deeplabv2 info``'s trainable count leaves out the frozen BN affine parameters and the
    two frozen head branches; the hub builds batch mode by name."""
    from deeplabv2.hub import deeplabv2_resnet50
    from deeplabv2.model.info import count_parameters, model_info
    model = build_model({**TINY_MODEL, "bn": "batch", "head_mode": "adaptsegnet"})
    total, trainable = count_parameters(model)
    bn_params = sum(2 * m.num_features for _, m in bns(model))
    branch = model.head.convs[2].weight.numel() + model.head.convs[2].bias.numel()
    assert total - trainable == bn_params + 2 * branch
    assert model_info(model, 33, 33)["trainable_parameters"] == trainable
    hub = deeplabv2_resnet50(5, bn="batch")
    assert hub.config["bn"] == "batch" and isinstance(hub.backbone.bn1, nn.BatchNorm2d)
    assert not hub.backbone.bn1.weight.requires_grad
    assert isinstance(deeplabv2_resnet50(5).backbone.bn1, FrozenBatchNorm2d)
    assert deeplabv2_resnet50(5, frozen_bn=False).backbone.bn1.weight.requires_grad


def test_export_folds_batch_mode_from_a_train_mode_model(tmp_path):
    """``load_model`` returns a network in train mode: the export still folds every BN by its
    running statistics and reproduces the eval-mode logits; the model keeps its mode."""
    import warnings
    from deeplabv2.deploy.export import export_torchscript
    model = batch_model().train()
    path = export_torchscript(model, tmp_path / "bn.pt", height=41, width=41)
    assert model.training
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.load(str(path))
    assert "BatchNorm2d" not in {m.original_name for m in traced.modules()}
    x = torch.randn(1, 3, 41, 41) * 30
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model.eval()(x), rtol=1e-4, atol=1e-4)


class Crash(Exception):
    pass


@pytest.mark.parametrize("method", ["adaptsegnet", "dacs"])
def test_batch_mode_two_branch_run_resumes_exactly(tmp_path, method):
    """A crash in iteration 3 and a resume to 4 give the uninterrupted run's weights, running
    statistics and method modules (teacher statistics included), bit for bit; the optimizer
    state of the two-branch head fits on resume."""
    more = [*TINY, *TARGET, f"adapt.method={method}", "model.bn=batch",
            "model.head_mode=adaptsegnet", "train.iterations=4", "train.checkpoint_every=2"]
    if method == "adaptsegnet":
        more.append("adapt.multi_level=true")
    full = train(load_config(None, [*more, f"train.out_dir={tmp_path / 'full'}"]))
    cfg = load_config(None, [*more, f"train.out_dir={tmp_path / 'cut'}"])

    def crash(iteration, logs):
        if iteration == 3:
            raise Crash

    with pytest.raises(Crash):
        train(cfg, on_iteration=crash)
    resumed = train(cfg, resume=str(tmp_path / "cut" / "last.pth"))
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert int(full.model.backbone.bn1.num_batches_tracked) == 8
    a = torch.load(tmp_path / "full" / "last.pth", weights_only=True)["adapt_state"]
    b = torch.load(tmp_path / "cut" / "last.pth", weights_only=True)["adapt_state"]
    for k, v in a["modules"].items():
        assert torch.equal(v, b["modules"][k]), k
