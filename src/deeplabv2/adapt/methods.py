"""The training methods as parts of the one training loop (:func:`deeplabv2.train.train`).

Every run is a :class:`Method`: plain supervised training is the base one (``adapt.method``
``none``, and ``source_only``, the lower bound of the adaptation tables), the adaptation methods
extend it. The loop knows no method by name; per iteration it calls:

1. :meth:`Method.set_lr` with the run's poly schedule at this iteration (the method applies it
   to its own optimizers, from ``adapt.d_lr``);
2. at each micro-step, for ``k`` in ``range(method.passes(iteration))``, ``loss =
   method.loss(step, k)`` on a :class:`Step` (the network as it is called, the source batch
   with labels, a target batch without) and its backward, each pass one forward of the network:
   that is how gradients accumulate under DDP (all passes but the last inside ``no_sync``);
   then :meth:`Method.discriminator_backward` for the method's own modules;
3. after the network's optimizer step, :meth:`Method.step_optimizers` (gradients averaged over
   ranks: these modules are outside DDP) and :meth:`Method.after_step` (e.g. the EMA teacher);
4. :meth:`Method.scalars` for the logs. :meth:`Method.extra_state` (the modules, e.g.
   discriminators or the EMA teacher, and their optimizers) goes into the training checkpoints.

=============  ============================================================================
method         what it adds to the source cross-entropy
=============  ============================================================================
none           nothing: plain supervised training (no adaptation state or logs)
source_only    nothing (the lower bound: validated on the target, as the methods are)
adaptsegnet    AdaptSegNet: a discriminator on the softmax of the (upsampled) scores; the
               network is trained to fool it on target images (``lambda_adv``); multi-level
               adds the layer3 head (seg ``lambda_seg_aux``, adv ``lambda_adv_aux``)
advent         ADVENT AdvEnt: the same on the weighted self-information maps
minent         ADVENT MinEnt: the entropy of the target prediction upsampled to the
               crop (``lambda_ent``; multi-level adds the layer3 head's, ``lambda_ent_aux``)
fda            FDA: source images restyled with the target's low-frequency amplitude
               (``fda_beta``), Charbonnier entropy on target after ``fda_ent_start`` steps;
               with ``target_labels`` (its self-training round) the target's cross-entropy
               against pseudo-labels (:mod:`deeplabv2.adapt.pseudo_labels`)
dacs           DACS: ClassMix of source onto target, EMA-teacher pseudo-labels weighted by
               confidence, colour jitter and blur of the mixed images
daformer       DAFormer's strategy: DACS's self-training (:class:`SelfTraining`) with EMA
               0.999, pseudo-label margins, and the thing-class ImageNet feature distance
hrda           HRDA: daformer's self-training with the network in HRDA's wrapper (context
               and detail crops, scale attention; :class:`HRDA`)
(adapt.mic)    MIC, an option of dacs, daformer and hrda: the block-masked,
               colour-augmented target trained against the teacher's pseudo-labels
               (:mod:`.mic`)
=============  ============================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ..model.deeplab import bn_mode
from ..model.hrda import hrda_losses
from ..model.preprocessing import from_rgb, to_rgb
from ..utils.distributed import average_gradients
from .discriminator import FCDiscriminator, adversarial_loss, discriminator_loss
from .entropy import FDA_ENTROPY_DIVISOR, charbonnier_entropy, entropy_loss, self_information
from .fda import fda_source_to_target
from .mic import augment_batch, block_mask, mic_settings
from .mix import EMATeacher, classmix_masks, mix, strong_augment, weighted_cross_entropy
from .self_training import (DAFORMER_MARGINS, FrozenBackbone, downscale_labels_by_majority,
                            feature_distance, pseudo_labels, thing_mask)

METHODS = ("none", "source_only", "adaptsegnet", "advent", "minent", "fda", "dacs", "daformer",
           "hrda")


@dataclass
class Step:
    """One micro-step's inputs. ``net`` is the network as the loop calls it (DDP-wrapped,
    MSC-wrapped or plain), ``model`` the plain :class:`~deeplabv2.model.DeepLabV2`;
    ``images``/``labels`` the preprocessed source batch and its ``(N, H, W)`` labels,
    ``target`` the preprocessed target batch (None when the method needs none);
    ``seg_loss(scores, labels)`` the run's cross-entropy of stride-8 scores (stride8 or full,
    as configured); ``msc_loss(outputs, labels)`` MSC's four-term loss of the network's
    outputs when it is MSC-wrapped (``train.msc_scales``), else None."""

    net: nn.Module
    model: nn.Module
    images: torch.Tensor
    labels: torch.Tensor
    target: torch.Tensor | None
    iteration: int
    seg_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    msc_loss: Callable | None = None
    #: ``(N, H, W)`` labels of ``target`` when the run reads them (``adapt.target_labels``:
    #: FDA's self-training round), else None
    target_labels: torch.Tensor | None = None
    #: ``(N, 5)`` ``(top, left, height, width, flipped)`` of each ``target`` crop in its image
    #: (:class:`~deeplabv2.data.transforms.TrainTransform` ``crop_box``) when the run reads them
    #: (``adapt.pseudo_margins_frame: image``), else None
    target_boxes: torch.Tensor | None = None


class Method(nn.Module):
    """Plain supervised training: the source cross-entropy, one pass per micro-step, no modules
    of its own. ``adapting=False`` is ``adapt.method: none``, training as it was before domain
    adaptation existed: its checkpoints carry no ``adapt_state``, its logs no ``adapt/``
    scalars, and an auxiliary head (``adapt.multi_level``) gets no loss. The adaptation
    methods extend it."""

    name = "source_only"
    needs_target = False

    def __init__(self, settings, model: nn.Module, adapting: bool = True):
        super().__init__()
        self.settings = settings
        self.adapting = adapting
        self.multi_level = adapting and bool(getattr(settings, "multi_level", False))
        # This step's loss terms, kept as tensors: read (a device sync) only by scalars().
        self.logs: dict[str, torch.Tensor | float] = {}

    # -- what the loop calls -------------------------------------------------------------------
    def set_lr(self, schedule: Callable[[float], float]) -> None:
        """This iteration's learning rate for the method's own optimizers: ``schedule(base)``
        is the run's poly policy at this iteration, applied to ``adapt.d_lr``."""
        for opt in self.optimizers():
            for group in opt.param_groups:
                group["lr"] = schedule(self.settings.d_lr)

    def passes(self, iteration: int) -> int:
        return 1

    def loss(self, step: Step, k: int) -> torch.Tensor:
        return self.source_loss(step, step.images)

    def discriminator_backward(self, accumulate: int) -> None:
        """Backpropagate the method's own modules' loss (the network gets no gradient from it)
        after a micro-step's passes, divided by ``accumulate`` as the network's loss is."""
        loss = self.discriminator_loss()
        if loss is not None:
            (loss / accumulate).backward()

    def step_optimizers(self) -> None:
        """Step the method's own optimizers after the network's step. Their modules are outside
        DDP: their gradients are averaged over ranks first, so every replica takes the same
        step (in one process there is nothing to average)."""
        for opt in self.optimizers():
            average_gradients(opt)
            opt.step()
            opt.zero_grad(set_to_none=True)

    def after_step(self, model: nn.Module, iteration: int) -> None:
        pass

    def scalars(self) -> dict[str, float]:
        """This step's loss terms, named ``adapt/<term>`` for the logs and TensorBoard."""
        if not self.adapting:
            return {}
        return {f"adapt/{k}": float(v) for k, v in self.logs.items()}

    def extra_state(self) -> dict | None:
        """What a training checkpoint keeps of the method (None: nothing, a plain run)."""
        if not self.adapting:
            return None
        return {"modules": self.state_dict(),
                "optimizers": [o.state_dict() for o in self.optimizers()]}

    def load_extra_state(self, state: dict | None) -> None:
        """Restore :meth:`extra_state`; a plain run ignores whatever the checkpoint holds."""
        if not self.adapting:
            return
        self.load_state_dict(state["modules"])
        for opt, s in zip(self.optimizers(), state["optimizers"]):
            opt.load_state_dict(s)

    # -- what the methods override -------------------------------------------------------------
    def discriminator_loss(self) -> torch.Tensor | None:
        return None

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return []

    # -- shared pieces -------------------------------------------------------------------------
    def require_one_crop_size(self, step: Step) -> None:
        """Methods that combine a source and a target crop pixel by pixel (FDA, DACS) need the
        two of one size (the config check refuses other settings; this guards direct use)."""
        if step.images.shape[-2:] != step.target.shape[-2:]:
            raise ValueError(f"{self.name} combines source and target crops of one size (set "
                             "adapt.target_crop_size to data.crop_size)")

    def scores(self, step: Step, x: torch.Tensor):
        """``(main, aux or None)`` stride-8 scores of ``x`` through ``step.net`` (MSC: the
        fused map)."""
        if step.msc_loss is not None:
            return step.net(x)[-1], None
        if self.multi_level:
            return step.net(x, upsample=False, aux=True)
        return step.net(x, upsample=False), None

    def source_loss(self, step: Step, x: torch.Tensor) -> torch.Tensor:
        """The supervised loss of ``x`` against the source labels (MSC: its four terms, each
        against labels shrunk to its own map); caches the scores."""
        if step.msc_loss is not None:
            outputs = step.net(x)
            self._source_scores = (outputs[-1].detach(), None)
            return step.msc_loss(outputs, step.labels)
        main, aux = self.scores(step, x)
        self._source_scores = (main.detach(), None if aux is None else aux.detach())
        loss = step.seg_loss(main, step.labels)
        if aux is not None:
            loss = loss + self.settings.lambda_seg_aux * step.seg_loss(aux, step.labels)
        self.logs["seg"] = loss.detach()
        return loss


class AdaptSegNet(Method):
    """Output-space adversarial training (Tsai et al., CVPR 2018); ``entropy_maps`` gives
    ADVENT's AdvEnt (Vu et al., CVPR 2019), whose discriminator sees ``-p log p`` maps."""

    name = "adaptsegnet"
    entropy_maps = False

    def __init__(self, settings, model: nn.Module):
        super().__init__(settings, model)
        c = model.num_classes
        self.d_main = FCDiscriminator(c)
        self.d_aux = FCDiscriminator(c) if self.multi_level else None
        params = list(self.d_main.parameters()) + (list(self.d_aux.parameters())
                                                   if self.d_aux is not None else [])
        self._opt = torch.optim.Adam(params, lr=settings.d_lr, betas=(0.9, 0.99))

    needs_target = True

    def passes(self, iteration: int) -> int:
        return 2

    def _maps(self, scores: torch.Tensor, size) -> torch.Tensor:
        """The discriminator's input: softmax (or self-information) of the scores upsampled
        to the input size, as both papers feed it."""
        up = self._align.upsample(scores, size)
        return self_information(up) if self.entropy_maps else F.softmax(up, dim=1)

    def loss(self, step: Step, k: int) -> torch.Tensor:
        self._align = step.model.alignment
        if k == 0:
            loss = self.source_loss(step, step.images)
            size = step.images.shape[-2:]
            self._source_maps = [None if s is None else self._maps(s, size)
                                 for s in self._source_scores]
            return loss
        main, aux = self.scores(step, step.target)
        size = step.target.shape[-2:]
        maps = [self._maps(main, size), None if aux is None else self._maps(aux, size)]
        loss = self.settings.lambda_adv * adversarial_loss(self.d_main, maps[0])
        if aux is not None:
            loss = loss + self.settings.lambda_adv_aux * adversarial_loss(self.d_aux, maps[1])
        self._target_maps = [None if m is None else m.detach() for m in maps]
        self.logs["adv"] = loss.detach()
        return loss

    def discriminator_loss(self) -> torch.Tensor:
        loss = discriminator_loss(self.d_main, self._source_maps[0], self._target_maps[0])
        if self.d_aux is not None and self._target_maps[1] is not None:
            loss = loss + discriminator_loss(self.d_aux, self._source_maps[1],
                                             self._target_maps[1])
        self.logs["disc"] = loss.detach()
        return loss

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self._opt]


class AdvEnt(AdaptSegNet):
    name = "advent"
    entropy_maps = True


class MinEnt(Method):
    """ADVENT's direct entropy minimisation on target predictions, at the input's resolution
    as released (advent/domain_adaptation/train_UDA.py train_minent: ``interp_target``
    upsamples the main and auxiliary scores to the target crop, then ``entropy_loss`` of their
    softmax, advent/utils/loss.py: ``-sum(p log2 p) / (n h w log2 C)``, the mean normalised
    entropy over the crop's pixels)."""

    name = "minent"

    needs_target = True

    def passes(self, iteration: int) -> int:
        return 2

    def loss(self, step: Step, k: int) -> torch.Tensor:
        if k == 0:
            return self.source_loss(step, step.images)
        main, aux = self.scores(step, step.target)
        size = step.target.shape[-2:]
        up = step.model.alignment.upsample
        loss = self.settings.lambda_ent * entropy_loss(up(main.float(), size))
        if aux is not None:
            loss = loss + self.settings.lambda_ent_aux * entropy_loss(up(aux.float(), size))
        self.logs["ent"] = loss.detach()
        return loss


class FDA(Method):
    """Fourier Domain Adaptation: train on source images in the target's style.

    The target's entropy term divides the entropy by :data:`~deeplabv2.adapt.entropy.
    FDA_ENTROPY_DIVISOR` (2.9444, ln 19) whatever the number of classes, as the released code
    does (YanchaoYang/FDA ``model/deeplab.py``): for 19 classes that is the normalised entropy,
    for SYNTHIA's 16 it is ``ln 16 / 2.9444 = 0.94`` of it at most, and the Charbonnier term
    (``eta = 2``) about ``0.94 ** 4 = 0.79`` of the ``ln C``-normalised one.

    With ``adapt.target_labels`` (the self-training round, YanchaoYang/FDA ``SStrain.py``)
    the target pass also takes the cross-entropy of the target image against its
    pseudo-labels, weight 1 as released (``loss_seg_src + loss_seg_psu + entW * loss_ent_psu``),
    at every step; the entropy still starts at ``fda_ent_start`` (``SStrain.py`` has no
    ``switch2entropy``: its configs set 0)."""

    name = "fda"

    needs_target = True

    def __init__(self, settings, model: nn.Module):
        super().__init__(settings, model)
        self.pseudo = bool(getattr(settings, "target_labels", None))

    def passes(self, iteration: int) -> int:
        return 2 if self.pseudo or iteration >= self.settings.fda_ent_start else 1

    def loss(self, step: Step, k: int) -> torch.Tensor:
        pre = step.model.preprocessing
        if k == 0:
            self.require_one_crop_size(step)
            with torch.no_grad():
                restyled = fda_source_to_target(to_rgb(step.images, pre),
                                                to_rgb(step.target, pre), self.settings.fda_beta)
                x = from_rgb(restyled.clamp(0, 255), pre).to(step.images.dtype)
            return self.source_loss(step, x)
        main, _ = self.scores(step, step.target)
        loss = None
        if self.pseudo:
            if step.target_labels is None:
                raise ValueError("adapt.target_labels is set but the step has no target labels")
            loss = step.seg_loss(main, step.target_labels)
            self.logs["pseudo"] = loss.detach()
        if step.iteration >= self.settings.fda_ent_start:
            ent = self.settings.fda_lambda_ent * charbonnier_entropy(
                main, self.settings.fda_eta, divisor=FDA_ENTROPY_DIVISOR)
            self.logs["ent"] = ent.detach()
            loss = ent if loss is None else loss + ent
        return loss


class SelfTraining(Method):
    """The self-training core on the loop (DACS and DAFormer's strategy; :mod:`.self_training`,
    :mod:`.mix`): pass 0 the source cross-entropy (plus :meth:`source_extra`), pass 1 ClassMix
    of the source onto the target, trained against the mixed labels (source labels, EMA-teacher
    pseudo-labels) weighted per pixel (1 on source pixels, the confidence share on pseudo-labelled
    ones, 0 in the pseudo-label margins). A subclass sets the released values below; the config
    keys ``ema_alpha``, ``pseudo_threshold`` and ``pseudo_margins`` (None: :attr:`margins`) are
    read here.

    With ``adapt.mic`` (:mod:`.mic`) a third pass: MIC's masked image consistency, the
    colour-augmented, block-masked target batch trained against pass 1's pseudo-labels of the
    unmasked target and their weights, times ``lambda`` (lhoyer/MIC ``dacs.py``: the masked loss
    is a backward of its own after the mixed one)."""

    needs_target = True
    #: the strong augmentation: kornia ColorJitter strength, channel order kornia gets
    jitter_strength = 0.25
    kornia_order = "bgr"
    #: ClassMix draws from each image's classes (DACS) or the batch's (DAFormer)
    classes_of_batch = False
    #: the released default of ``adapt.pseudo_margins`` ([top, bottom, left, right] or None)
    margins = None
    #: the teacher's update after optimizer step ``it`` (0-based) uses the rate of iteration
    #: ``it + ema_offset`` (see :meth:`after_step`)
    ema_offset = 0

    def __init__(self, settings, model: nn.Module):
        super().__init__(settings, model)
        self.teacher = EMATeacher(model, settings.ema_alpha,
                                  batch_stats=self.teacher_batch_stats(model))
        given = getattr(settings, "pseudo_margins", None)
        self.pseudo_margins = tuple(given) if given is not None else self.margins
        self.margins_frame = getattr(settings, "pseudo_margins_frame", "crop")
        self.mic = mic_settings(getattr(settings, "mic", None))
        self._pseudo = None  # pass 1's pseudo-labels and weights, for the MIC pass

    @staticmethod
    def teacher_batch_stats(model: nn.Module) -> bool:
        """Whether the teacher predicts with batch statistics (see :class:`EMATeacher`)."""
        return getattr(model, "config", {}).get("bn") == "batch"

    def passes(self, iteration: int) -> int:
        return 3 if self.mic is not None else 2

    def source_extra(self, step: Step) -> torch.Tensor | None:
        """A term added to pass 0's loss (DAFormer: the feature distance); None: nothing."""
        return None

    def loss(self, step: Step, k: int) -> torch.Tensor:
        if k == 0:
            loss = self.source_loss(step, step.images)
            extra = self.source_extra(step)
            return loss if extra is None else loss + extra
        if k == 2:
            return self.masked_loss(step)
        self.require_one_crop_size(step)
        pre, size = step.model.preprocessing, step.target.shape[-2:]
        boxes = None
        if self.margins_frame == "image":
            if step.target_boxes is None:
                raise ValueError(f"{self.name}: adapt.pseudo_margins_frame=image needs the "
                                 "target crops' boxes in the step (train.py passes them)")
            boxes = step.target_boxes
        with torch.no_grad():
            # upsampled; eval mode, or train mode under batch statistics (see EMATeacher)
            pseudo, pseudo_weights, weight = pseudo_labels(
                self.teacher_logits(step.target), self.settings.pseudo_threshold,
                self.pseudo_margins, crop_boxes=boxes)
            masks = classmix_masks(step.labels, classes_of_batch=self.classes_of_batch)
            mixed = strong_augment(mix(masks, to_rgb(step.images, pre), to_rgb(step.target, pre)),
                                   jitter=self.jitter_strength, kornia_order=self.kornia_order)
            x = from_rgb(mixed, pre).to(step.images.dtype)
            labels = mix(masks, step.labels, pseudo)
            weights = mix(masks, torch.ones_like(pseudo_weights), pseudo_weights)
        loss = self.student_loss(step, x, labels, weights)
        self.logs.update(mix=loss.detach(), pseudo_weight=weight)
        if self.mic is not None:
            self._pseudo = (pseudo, pseudo_weights)
        return loss

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's logits of ``x`` at its size, for the pseudo-labels."""
        return self.teacher(x)

    def student_loss(self, step: Step, x: torch.Tensor, labels: torch.Tensor,
                     weights: torch.Tensor) -> torch.Tensor:
        """The student's weighted cross-entropy of ``x`` (mixed or masked) against ``labels``
        with per-pixel ``weights``: its scores upsampled to the crop."""
        main, _ = self.scores(step, x)
        logits = step.model.alignment.upsample(main, x.shape[-2:])
        return weighted_cross_entropy(logits, labels, weights)

    def masked_loss(self, step: Step) -> torch.Tensor:
        """MIC's pass (see :mod:`.mic`): the target batch colour-augmented as this method
        augments (:func:`~.mic.augment_batch`), multiplied by a block mask
        (:func:`~.mic.block_mask`) in the network's input space, through the student; the
        weighted cross-entropy against pass 1's pseudo-labels and weights, times ``lambda``."""
        if self._pseudo is None:
            raise RuntimeError(f"{self.name}: the MIC pass (2) needs the pseudo-labels of "
                               "pass 1 of the same micro-step")
        pseudo, weights = self._pseudo
        self._pseudo = None
        mic, pre = self.mic, step.model.preprocessing
        n, _, height, width = step.target.shape
        with torch.no_grad():
            x = step.target
            if mic.augment:
                x = from_rgb(augment_batch(to_rgb(x, pre), self.jitter_strength,
                                           self.kornia_order), pre).to(x.dtype)
            mask = block_mask(n, height, width, mic.block_size, mic.mask_ratio, device=x.device)
            x = x * mask.to(x.dtype)
        loss = mic.weight * self.student_loss(step, x, pseudo, weights)
        self.logs.update(mic=loss.detach(), mic_kept=mask.mean())
        return loss

    def after_step(self, model: nn.Module, iteration: int) -> None:
        self.teacher.update(model, iteration + self.ema_offset)


class DACS(SelfTraining):
    """Domain adaptation via cross-domain mixed sampling (ClassMix + mean teacher), as DACS's
    trainUDA.py: EMA rate ``min(1 - 1 / (it + 1), 0.99)`` after optimizer step ``it``, jitter
    strength 0.25 on BGR channels, ClassMix per image, no margins."""

    name = "dacs"


class DAFormer(SelfTraining):
    """DAFormer's training strategy on DeepLab v2 (Hoyer et al., CVPR 2022; lhoyer/DAFormer
    mmseg/models/uda/dacs.py, configs/_base_/uda/dacs_a999_fdthings.py, experiments.py id 5
    ``('dlv2red', 'r101v1c', 'dacs_a999_fdthings', 0.01, True)``): DACS's self-training with

    * the teacher's rate ``min(1 - 1 / (i + 1), alpha)``, ``alpha`` 0.999 in its config, where
      ``i`` (``local_iter``) is the number of optimizer steps taken: their update runs at the
      start of iteration ``i >= 1``, ours after step ``it = i - 1`` (``ema_offset`` 1), so the
      teacher of each pseudo-label pass is the same; the teacher normalises by batch statistics
      whenever the student's BN does (``model.bn`` batch or train: their EMA model is a
      train-mode submodule with trainable BN, dropout off);
    * pseudo-label margins ``[15, 120, 0, 0]`` (``adapt.pseudo_margins``);
    * ClassMix of the batch's classes (:func:`classmix_masks` ``classes_of_batch``), colour
      jitter strength 0.2 on RGB (``dacs.py`` base config, mmseg ``to_rgb``), blur as DACS;
    * the thing-class ImageNet feature distance on the source pass (``adapt.fdist_lambda``
      0.005, ``fdist_classes``, ``fdist_min_ratio`` 0.75): :func:`feature_distance` between
      the last backbone stage of the student (this pass's forward) and of a frozen copy of the
      backbone as initialised (:class:`FrozenBackbone`, built from the network at set-up,
      i.e. the ``model.weights`` init file, and kept in the checkpoints with the teacher, so a
      resume is exact whatever the init file is then), on cells whose label, downscaled to the
      feature grid by :func:`downscale_labels_by_majority`, is a thing class.

    Rare-class sampling and the optimizer (AdamW, warm-up, head x10) are the data's and the
    loop's (``train.optimizer``, ``train.warmup_iters``, ``train.param_groups``)."""

    name = "daformer"
    jitter_strength = 0.2
    kornia_order = "rgb"
    classes_of_batch = True
    margins = DAFORMER_MARGINS
    ema_offset = 1

    def __init__(self, settings, model: nn.Module):
        super().__init__(settings, model)
        self.fdist_lambda = float(settings.fdist_lambda)
        self.imagenet = FrozenBackbone(self.student_network(model).backbone) \
            if self.fdist_lambda > 0 else None

    @staticmethod
    def student_network(model: nn.Module) -> nn.Module:
        """The DeepLab v2 whose backbone the feature distance reads."""
        return model

    @staticmethod
    def teacher_batch_stats(model: nn.Module) -> bool:
        config = getattr(model, "config", None)
        return bool(config) and config.get("backbone", "resnet") == "resnet" \
            and bn_mode(config) in ("batch", "train")

    def loss(self, step: Step, k: int) -> torch.Tensor:
        if k != 0 or self.imagenet is None:
            return super().loss(step, k)
        # the student's last backbone stage, from the source pass's own forward
        seen: list[torch.Tensor] = []
        hook = step.model.backbone.register_forward_hook(lambda m, i, o: seen.append(o))
        try:
            loss = self.source_loss(step, step.images)
        finally:
            hook.remove()
        if len(seen) != 1:
            raise RuntimeError(f"daformer: expected one backbone forward in the source pass, "
                               f"saw {len(seen)}")
        fdist = self.fdist_lambda * self.feature_distance(step, seen[0])
        self.logs["fdist"] = fdist.detach()
        return loss + fdist

    def feature_distance(self, step: Step, features: torch.Tensor) -> torch.Tensor:
        """The unweighted distance of ``features`` (the student's, of ``step.images``) to the
        frozen ImageNet backbone's, on the thing cells of ``step.labels``."""
        with torch.no_grad():
            reference = self.imagenet(step.images)
        mask = None
        if self.settings.fdist_classes is not None:
            cells = downscale_labels_by_majority(
                step.labels, step.model.output_stride, self.settings.fdist_min_ratio,
                step.model.num_classes, size=features.shape[-2:])
            mask = thing_mask(cells, self.settings.fdist_classes)
        return feature_distance(features, reference, mask)


class HRDA(DAFormer):
    """HRDA's training (Hoyer et al., ECCV 2022; lhoyer/HRDA mmseg/models/uda/dacs.py with
    segmentors/hrda_encoder_decoder.py, decode_heads/hrda_head.py; experiments.py id 41,
    ``('dlv2red', 'r101v1c', 'dacs_a999_fdthings')`` with ``hrda1-512-0.1``) on DAFormer's
    self-training, with the network wrapped in :class:`~deeplabv2.model.hrda.HRDA`:

    * every student pass (source, mixed, MIC's masked) is the wrapper's two-crop forward
      (``forward_train``: the context crop at ``adapt.hrda_context_scale``, a detail crop of
      ``adapt.hrda_detail_crop`` drawn on the 8-pixel grid, fused by the scale attention),
      called through the network as the loop holds it (DDP: one forward, two network passes
      inside), and its loss :func:`~deeplabv2.model.hrda.hrda_losses`: the fused scores
      ``1 - w`` and the detail scores ``w`` (``adapt.hrda_detail_weight``, 0.1) against the
      labels (and per-pixel weights) of the crop and of the detail box. The detail box is drawn
      from the global generator, which the loop seeds per (seed, iteration, rank): a resume
      draws the same boxes. (Released: numpy's ``randint`` in ``get_crop_bbox``.)
    * the teacher's pseudo-labels of the target crop are the wrapper's inference forward on it
      (:meth:`~deeplabv2.model.hrda.HRDA.predict`: context at 0.5, detail by half-overlapping
      detail windows, unmasked attention; ``generate_pseudo_label`` -> ``encode_decode``), in
      the teacher's BN mode; the EMA runs over the whole wrapper, scale attention included.
    * the feature distance (``adapt.fdist_lambda``) reads the context pass's backbone features
      (experiments.py ``feature_scale = 0.5`` for HRDA): the frozen ImageNet backbone on the
      same half-size crop, the labels downscaled by majority in blocks of ``8 / context
      scale`` (16) pixels to the feature grid."""

    name = "hrda"

    def __init__(self, settings, model: nn.Module):
        if not getattr(model, "is_hrda", False):
            raise ValueError("adapt.method=hrda needs the network wrapped in "
                             "deeplabv2.model.hrda.HRDA (train.py builds it so)")
        super().__init__(settings, model)
        self.detail_weight = float(settings.hrda_detail_weight)

    @staticmethod
    def student_network(model: nn.Module) -> nn.Module:
        return model.network

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher.model.predict(x)

    def _hrda_loss(self, step: Step, x: torch.Tensor, labels: torch.Tensor,
                   weights: torch.Tensor | None):
        out = step.net(x, hrda_train=True)
        losses = hrda_losses(out, labels, weights, self.detail_weight)
        return sum(losses.values()), out

    def student_loss(self, step: Step, x: torch.Tensor, labels: torch.Tensor,
                     weights: torch.Tensor) -> torch.Tensor:
        return self._hrda_loss(step, x, labels, weights)[0]

    def loss(self, step: Step, k: int) -> torch.Tensor:
        if k != 0:
            return SelfTraining.loss(self, step, k)
        loss, out = self._hrda_loss(step, step.images, step.labels, None)
        self.logs["seg"] = loss.detach()
        if self.imagenet is None:
            return loss
        features = out["context_features"]
        with torch.no_grad():
            reference = self.imagenet(step.model.context_input(step.images))
        mask = None
        if self.settings.fdist_classes is not None:
            factor = int(round(step.model.output_stride / step.model.context_scale))
            cells = downscale_labels_by_majority(step.labels, factor,
                                                 self.settings.fdist_min_ratio,
                                                 step.model.num_classes,
                                                 size=features.shape[-2:])
            mask = thing_mask(cells, self.settings.fdist_classes)
        fdist = self.fdist_lambda * feature_distance(features, reference, mask)
        self.logs["fdist"] = fdist.detach()
        return loss + fdist


_CLASSES = {"none": Method, "source_only": Method, "adaptsegnet": AdaptSegNet,
            "advent": AdvEnt, "minent": MinEnt, "fda": FDA, "dacs": DACS, "daformer": DAFormer,
            "hrda": HRDA}


def build_method(settings, model: nn.Module) -> Method:
    """The method ``settings.method`` names, for ``model``."""
    if settings.method not in _CLASSES:
        raise ValueError(f"adapt.method={settings.method!r}; valid: {', '.join(METHODS)}")
    if settings.method == "none":  # plain supervised training, as before adaptation existed
        return Method(settings, model, adapting=False)
    return _CLASSES[settings.method](settings, model)
