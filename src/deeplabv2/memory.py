"""Will one training step fit? Checked before the first step, so that an impossible crop is one
line, not a process the kernel kills without a word (issue 24, item 3).

:func:`estimate_step` estimates the memory of one training step of the configured run, in
bytes, as the sum of

* **state**: the network's parameters and buffers, a gradient for every trainable parameter,
  SGD's momentum buffer (``train.momentum`` > 0), DDP's gradient buckets (another gradient's
  worth, under ``torchrun``), and the method's own modules (discriminators with their
  gradients and Adam's two moments, DACS's teacher copy);
* **activations**: the bytes of the tensors that autograd saves for the backward pass, measured
  (:func:`measure_saved`) by running the method's real passes (``method.loss`` on the network as
  the loop calls it: MSC's extra scales, ``train.loss_at: full``'s upsampled logits, the
  target forward, the teacher, the discriminators' inputs and own forward, under the run's
  autocast and memory format) at two small crops of the configured aspect, one image each,
  counting each saved storage once (parameters excluded; bf16 saves half; under
  ``train.checkpoint_backbone`` the hooks see what the checkpoints keep: each segment's
  input). Those bytes are
  ``a + b * pixels`` (``a``: what does not grow with the crop, e.g. the autocast weight
  copies), fitted per pass through the two probes and evaluated at ``data.batch_size`` crops
  of ``data.crop_size`` (one micro-step: ``train.accumulate`` does not change it); the largest
  pass counts, as each pass's backward frees its graph before the next (the fit is within 5%
  of the saved bytes counted at 321 x 321 and 384 x 640). The backward pass adds the
  gradients of the activations while it frees the saved tensors: :data:`BACKWARD_MARGIN`
  times the saved bytes covers it. Not measured: the work the methods do without gradients
  (DACS's teacher, mixing and blur, FDA's Fourier transform), small next to a ResNet's
  activations;
* **batches**: the float32 image and int64 label of every crop in flight (20 bytes a pixel):
  the batch being trained on, and on the CPU the ``2 * data.num_workers`` batches the
  DataLoader's workers prepare ahead (they live in the same RAM), source and target.

:func:`available_bytes` is what the device has free, plus what the run already holds (the
network built, a resumed optimizer), since the estimate counts those too: on CUDA
``torch.cuda.mem_get_info`` (plus the cache PyTorch keeps but does not use); on the CPU
``MemAvailable`` of ``/proc/meminfo``, lowered by a cgroup's memory limit (v2 ``memory.max``,
v1 ``memory.limit_in_bytes``, minus its usage less the reclaimable page cache) and by an
address-space limit (``ulimit -v``) when set. Under ``torchrun`` on one host the CPU ranks share
the host's memory: each may count on ``1 / LOCAL_WORLD_SIZE`` of it; on CUDA each rank is taken
to have its own GPU, as torchrun's ``LOCAL_RANK`` placement gives it, and every rank refuses
when one does (:func:`check_training_memory`), so that none waits for the others forever.

Against the peak resident memory of real steps on the CPU (2 steps, ``MALLOC_MMAP_THRESHOLD_``
set so that freed blocks leave the process), the estimate was 1.15 to 1.55 times the peak: the
demo network (stride-8 and full-resolution loss, bf16, MSC, NCHW), VGG-16, ResNet-101 with
frozen BN (257 x 257, batch 2: 1.48 GiB estimated, 0.99 GiB measured), AdaptSegNet
multi-level; 0.7 times for DACS and FDA on the 8-wide test network, whose activations are
smaller than the unmeasured image work above.

The probe costs two forward passes per method pass at up to 97 x 97 pixels, no backward
pass: about 0.05 s for the demo network, 0.5 s for ResNet-101 on 2 CPU cores (one 321 x 321
step: 3 s). It runs with the RNG forked and restores the network's and the method's buffers
(BN statistics) and the method's attributes (its logged terms, cached scores), so the
training is bit for bit what it is without the check. ``train.check_memory: false`` skips it.

:func:`crop_warnings` is the other half of the item: a crop larger than every image warns (one
line naming the key) and trains, since padding wastes the step but breaks nothing.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import TrainingError
from .precision import autocast_context

# (measured peak - state - batches) / saved bytes: 1.0 to 1.35 for the demo network (MSC,
# bf16, NCHW), under 1 for VGG-16 and ResNet-101 (not all their gradients and momentum are
# alive at the peak); the rest is margin, e.g. for the CUDA caching allocator's fragmentation
BACKWARD_MARGIN = 1.6
PROBE_PIXELS = 97 * 97  # the larger probe crop's pixels (the smaller: 0.36 of them)
PIXEL_BYTES = 3 * 4 + 8  # a crop's float32 RGB image and int64 label, per pixel
GIB = 2 ** 30


@dataclass
class Estimate:
    """Bytes of one training step (:func:`estimate_step`) and what they consist of."""
    state: int
    activations: int
    batches: int

    @property
    def total(self) -> int:
        return self.state + self.activations + self.batches

    def parts(self) -> str:
        return (f"weights, gradients and optimizer state {gib(self.state)}, activations "
                f"{gib(self.activations)}, batches {gib(self.batches)}")


def gib(n: float) -> str:
    """``n`` bytes for a message: 41 GiB, 1.4 GiB, 730 MiB, 7.3 MiB."""
    for unit, size in (("GiB", GIB), ("MiB", 2 ** 20)):
        if n >= 0.95 * size or unit == "MiB":
            v = n / size
            return f"{v:.0f} {unit}" if v >= 9.5 else f"{v:.1f} {unit}"


# -- what the step needs ----------------------------------------------------------------------
def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _optimizer_slots(opt: torch.optim.Optimizer) -> int:
    """State tensors per parameter: SGD's momentum buffer (when momentum), Adam's two
    moments (others: taken as two)."""
    if isinstance(opt, torch.optim.SGD):
        return int(any(g.get("momentum", 0) for g in opt.param_groups))
    return 2


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                method: torch.nn.Module, ddp: bool = False) -> int:
    """Parameters, buffers, gradients and optimizer state of the network and the method."""
    total = 0
    for module, opts in ((model, [optimizer]), (method, method.optimizers())):
        trainable = [p for p in module.parameters() if p.requires_grad]
        total += _bytes(module.parameters()) + _bytes(module.buffers()) + _bytes(trainable)
        for opt in opts:
            total += _optimizer_slots(opt) * _bytes(p for g in opt.param_groups
                                                   for p in g["params"])
    if ddp:  # the reducer's buckets: one more gradient of the network
        total += _bytes(p for p in model.parameters() if p.requires_grad)
    return total


def held_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               method: torch.nn.Module, device: torch.device) -> int:
    """What the run already holds on ``device`` of what :func:`state_bytes` counts (the
    network and the method built, a resumed optimizer's state)."""
    seen: dict[int, int] = {}
    tensors = [*model.parameters(), *model.buffers(), *method.parameters(), *method.buffers()]
    for opt in (optimizer, *method.optimizers()):
        tensors += [v for s in opt.state.values() for v in s.values()
                    if isinstance(v, torch.Tensor)]
    for t in tensors:
        if t.device == device or (t.device.type == device.type == "cpu"):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _probe_sizes(size, model=None) -> list[tuple[int, int]]:
    """Two small crops of ``size``'s aspect (each side at least 33 pixels, at most the crop's).
    An HRDA wrapper (:mod:`deeplabv2.model.hrda`) runs crops on its grid only: each side a
    multiple of ``8 / context scale`` pixels (at least two of them); its detail crop shrinks
    with the probe (:func:`_probe_detail`), so that both of its passes grow with the crop's
    pixels as the linear fit takes them to."""
    h, w = size
    big = min(1.0, math.sqrt(PROBE_PIXELS / (h * w)))
    if getattr(model, "is_hrda", False):
        m = int(round(8 / model.context_scale))

        def fit(v, top):
            return min(top, max(2 * m, -(-v // m) * m))
        return [(fit(round(h * f), h), fit(round(w * f), w)) for f in (0.6 * big, big)]
    return [(min(h, max(33, round(h * f))), min(w, max(33, round(w * f))))
            for f in (0.6 * big, big)]


def _probe_detail(detail, crop, probe) -> tuple[int, int]:
    """HRDA's detail crop for a probe crop: the same share of each side as ``detail`` of
    ``crop`` (512 of 1024: half), on the 8-pixel grid, at most the probe's side."""
    return tuple(min(p, max(8, int(round(d * p / c / 8)) * 8))
                 for d, c, p in zip(detail, crop, probe))


@contextlib.contextmanager
def _detail_crop(modules, detail):
    """Every HRDA wrapper among ``modules`` (the network, the method's teacher; each once)
    runs with the detail crop ``detail`` inside the block, its own again after it."""
    wrappers = {id(m): m for mod in modules for m in mod.modules()
                if getattr(m, "is_hrda", False)}.values()
    saved = [(w, w.detail_crop) for w in wrappers]
    for w, _ in saved:
        w.detail_crop = tuple(detail)
    try:
        yield
    finally:
        for w, own in saved:
            w.detail_crop = own


def measure_saved(method, make_step, net: torch.nn.Module, device: torch.device, cfg,
                  iteration: int, size, target_size) -> list[int]:
    """Bytes autograd saves in each pass of one micro-step of one image of ``size``
    (``target_size`` for the target image): the method's real passes through ``net`` (the
    network as the loop calls it, unwrapped from DDP), then the method's own loss (the
    discriminators), each graph freed before the next. Nothing of the run changes: the RNG is
    forked, buffers and the method's attributes are restored, no gradient is made."""
    t = cfg.train
    net = getattr(net, "module", net)  # DDP's forward expects its backward; the module does not
    protected = {p.untyped_storage().data_ptr()
                 for m in (net, method) for p in [*m.parameters(), *m.buffers()]}
    buffers = [(b, b.clone()) for m in (net, method) for b in m.buffers()]
    attributes = dict(vars(method))
    logs = dict(method.logs)

    def batch(h, w):
        x = torch.zeros(1, 3, h, w, device=device)
        return x.contiguous(memory_format=torch.channels_last) if t.channels_last else x

    sizes: list[int] = []

    def counted(fn):
        seen: dict[int, int] = {}

        def pack(x):
            s = x.untyped_storage()
            if s.data_ptr() not in protected:
                seen[s.data_ptr()] = s.nbytes()
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            out = fn()  # kept alive (and with it what it saved) until counted
        sizes.append(sum(seen.values()))
        del out

    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            step = make_step(net=net, images=batch(*size),
                             labels=torch.zeros(1, *size, dtype=torch.long, device=device),
                             target=batch(*target_size) if method.needs_target else None,
                             iteration=iteration,
                             target_labels=torch.zeros(1, *target_size, dtype=torch.long,
                                                       device=device)
                             if method.needs_target else None,
                             # the crop as a whole image (adapt.pseudo_margins_frame: image)
                             target_boxes=torch.tensor([[0, 0, *target_size, 0]])
                             if method.needs_target else None)
            for k in range(method.passes(iteration)):
                with autocast_context(device, t.amp):
                    counted(lambda: method.loss(step, k))
            counted(method.discriminator_loss)
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for key in set(vars(method)) - set(attributes):  # e.g. the cached scores and maps
            del vars(method)[key]
        vars(method).update(attributes)
        method.logs = logs  # filled in place
    return sizes


def estimate_step(cfg, model, optimizer, method, make_step, net, device: torch.device,
                  ddp: bool = False, iteration: int = 0) -> Estimate:
    """One training step's bytes (see the module docstring for what is counted)."""
    d, a = cfg.data, cfg.adapt
    crop = tuple(d.crop_size)
    target_crop = tuple(a.target_crop_size or d.crop_size)
    probes = []
    for size, target_size in zip(_probe_sizes(crop, model), _probe_sizes(target_crop, model)):
        # HRDA: the detail crop the same share of the probe as of the crop
        inner = (_detail_crop([model, getattr(net, "module", net), method],
                              _probe_detail(model.detail_crop, crop, size))
                 if getattr(model, "is_hrda", False) else contextlib.nullcontext())
        with inner:
            probes.append((size[0] * size[1],
                           measure_saved(method, make_step, net, device, cfg, iteration, size,
                                         target_size)))
    (p1, s1), (p2, s2) = probes
    pixels = d.batch_size * crop[0] * crop[1]
    saved = 0
    for a1, a2 in zip(s1, s2):  # each pass: a + b * pixels through the two probes
        b = max(0.0, (a2 - a1) / (p2 - p1)) if p2 != p1 else a2 / p2
        saved = max(saved, max(0.0, a2 - b * p2) + b * pixels)
    in_flight = 1 + (2 * d.num_workers if device.type == "cpu" else 0)
    crop_pixels = crop[0] * crop[1] + (target_crop[0] * target_crop[1]
                                       if method.needs_target else 0)
    return Estimate(state=state_bytes(model, optimizer, method, ddp),
                    activations=int(BACKWARD_MARGIN * saved),
                    batches=in_flight * d.batch_size * crop_pixels * PIXEL_BYTES)


# -- what the device has -----------------------------------------------------------------------
def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _inactive_file(stat: Path) -> int:
    """The reclaimable page cache a cgroup's usage includes."""
    try:
        for line in stat.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key in ("inactive_file", "total_inactive_file"):
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def cgroup_available() -> int | None:
    """The smallest ``limit - usage`` over this process's memory cgroup and its ancestors
    (v2 ``memory.max``/``memory.current``, v1 ``memory.limit_in_bytes``/``usage_in_bytes``);
    None without a limit."""
    root = Path("/sys/fs/cgroup")
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    best = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            base, files = root, ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):  # v1
            base, files = root / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        folder = base / path.lstrip("/")
        while True:
            limit, usage = _read_int(folder / files[0]), _read_int(folder / files[1])
            if limit is not None and usage is not None and limit < 2 ** 60:
                free = limit - max(0, usage - _inactive_file(folder / "memory.stat"))
                best = free if best is None else min(best, free)
            if folder == base or folder == folder.parent:
                break
            folder = folder.parent
    return best


def _address_space_available() -> int | None:
    """``ulimit -v`` less this process's address space, when a limit is set."""
    try:
        import resource
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY:
            return None
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return soft - int(line.split()[1]) * 1024
    except (ImportError, OSError, ValueError):
        pass
    return None


def available_bytes(device: torch.device) -> tuple[int, str] | None:
    """``(bytes free for this process on device, where)``; None when it cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free, f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type != "cpu":
        return None
    try:
        meminfo = Path("/proc/meminfo").read_text()
        free = int(meminfo.split("MemAvailable:")[1].split()[0]) * 1024
    except (OSError, IndexError, ValueError):
        return None
    where = "this machine"
    for limit, what in ((cgroup_available(), "this process's cgroup (memory limit)"),
                        (_address_space_available(), "this process (ulimit -v)")):
        if limit is not None and limit < free:
            free, where = max(0, limit), what
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if local > 1:
        free //= local
        where += f", shared by {local} processes"
    return free, where


# -- the check train() runs -----------------------------------------------------------------------
def check_training_memory(cfg, model, optimizer, method, make_step, net, device, info,
                          iteration: int = 0) -> str | None:
    """Refuse (:class:`TrainingError`, one line naming ``data.crop_size`` and
    ``data.batch_size``) when one step's estimate exceeds the memory available; otherwise
    return a line for the log, or None when unchecked (``train.check_memory: false``, or the
    device's free memory cannot be told). Every rank refuses when one does."""
    from .utils import distributed as dist_utils
    if not cfg.train.check_memory:
        return None
    est = estimate_step(cfg, model, optimizer, method, make_step, net, device,
                        ddp=info.enabled, iteration=iteration)
    free = available_bytes(device)
    fits = free is None or est.total <= free[0] + held_bytes(model, optimizer, method, device)
    if info.enabled:
        fits = dist_utils.all_reduce_sum(torch.tensor([float(not fits)], device=device)) == 0
    if free is None:
        return None
    available = free[0] + held_bytes(model, optimizer, method, device)
    d, a = cfg.data, cfg.adapt
    what = f"data.crop_size={list(d.crop_size)}"
    if method.needs_target and a.target_crop_size:
        what += f" (adapt.target_crop_size={list(a.target_crop_size)})"
    what += f" with data.batch_size={d.batch_size}"
    if not fits:
        raise TrainingError(
            f"{what}: one training step needs about {gib(est.total)} ({est.parts()}), "
            f"{free[1]} has {gib(available)} available; lower data.crop_size or "
            f"data.batch_size (train.accumulate=K keeps the effective batch with a K times "
            f"smaller data.batch_size), or set train.check_memory=false to try anyway")
    return (f"memory: one training step needs about {gib(est.total)} of the {gib(available)} "
            f"{free[1]} has available")


# -- crops larger than the images -------------------------------------------------------------
def crop_warning(key: str, crop, sizes: dict, max_scale: float, scale_key: str,
                 images: str = "training images") -> str | None:
    """A line naming ``key`` when ``crop`` (h, w) is larger, in height or in width, than every
    image of ``sizes`` (``{(h, w): how many images}``) at the largest scale the augmentation
    draws (``scale_key``'s): then every training crop is partly padding, ignored pixels that
    cost time and memory. None otherwise, or when no size is known."""
    if not sizes:
        return None
    ch, cw = crop
    scaled = {(h, w): (max(1, round(h * max_scale)), max(1, round(w * max_scale)))
              for h, w in sizes}
    if any(ch <= h and cw <= w for h, w in scaled.values()):
        return None
    largest = max(sizes, key=lambda s: s[0] * s[1])
    lh, lw = scaled[largest]
    count = sum(sizes.values())
    at = f", even at {scale_key}'s largest scale {max_scale:g}" if max_scale != 1 else ""
    return (f"warning: {key}={list(crop)} is larger, in height or width, than every one of "
            f"the {count} {images} checked{at} (the largest, {largest[0]}x{largest[1]}, "
            f"becomes {lh}x{lw}): every training crop is partly padding, ignored pixels that "
            f"cost time and memory; [{min(ch, lh)}, {min(cw, lw)}] would fit the largest")


def crop_warnings(cfg, train_ds, target_ds=None) -> list[str]:
    """:func:`crop_warning` for the training crops (``data.crop_size`` on the training images,
    the target crop on the target images), from the image sizes ``data.check`` read
    (``checked_sizes``; nothing is said of images it did not read)."""
    d, a = cfg.data, cfg.adapt

    def sizes(ds, resize):  # a fixed resize (data.resize) makes every checked image that size
        checked = getattr(ds, "checked_sizes", {})
        return {tuple(resize): sum(checked.values())} if resize and checked else checked

    scale, scale_key = ((max(d.scales), "data.scales") if d.scales
                        else (d.scale_range[1], "data.scale_range"))
    lines = [crop_warning("data.crop_size", d.crop_size, sizes(train_ds, d.resize),
                          scale, scale_key)]
    if target_ds is not None:
        key = "adapt.target_crop_size" if a.target_crop_size else "data.crop_size"
        lines.append(crop_warning(key, a.target_crop_size or d.crop_size,
                                  sizes(target_ds, a.target_resize),
                                  a.target_scale_range[1], "adapt.target_scale_range",
                                  "target images"))
    return [line for line in lines if line]
