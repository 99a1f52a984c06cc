"""The DeepLab v2 authors' Caffe models (``.caffemodel``) -> this project's checkpoints, without
Caffe.

A ``.caffemodel`` is a binary protobuf ``NetParameter`` (BVLC ``src/caffe/proto/caffe.proto``,
the same field numbers in DeepLab's fork). It is read here by a small reader of the protobuf
wire format (varints, length-delimited fields, packed and unpacked repeated floats) that decodes
only the fields a converter needs:

* ``NetParameter``: ``layer`` = 100 (``LayerParameter``) and the legacy ``layers`` = 2
  (``V1LayerParameter``);
* ``LayerParameter``: ``name`` = 1, ``type`` = 2 (string), ``blobs`` = 7,
  ``convolution_param`` = 106, ``batch_norm_param`` = 139;
* ``V1LayerParameter``: ``name`` = 4, ``type`` = 5 (enum: CONVOLUTION = 4, INNER_PRODUCT = 14,
  POOLING = 17, ...), ``blobs`` = 6, ``convolution_param`` = 10;
* ``BlobProto``: ``shape`` = 7 (``BlobShape.dim`` = 1, packed int64), the legacy
  ``num``/``channels``/``height``/``width`` = 1-4, ``data`` = 5 (packed float),
  ``double_data`` = 8;
* ``ConvolutionParameter``: ``num_output`` 1, ``bias_term`` 2, ``pad`` 3, ``kernel_size`` 4,
  ``stride`` 6, ``dilation`` 18; ``BatchNormParameter``: ``eps`` 3 (default 1e-5).

Why a reader and not the ``protobuf`` package with a message description built in code: it
needs no dependency (``protobuf`` would be one for a single command), and it knows where it is:
a damaged file is refused with the byte offset, the layer and the blob where it breaks ("truncated
at byte N inside layer 'res4b22_branch2c' blob 0"), where ``ParseFromString`` says only that it
failed. Unknown fields are skipped, as protobuf does, except at the top level, where a field that
``NetParameter`` does not have means another kind of protobuf (an ONNX model, ...).

The mapping (:func:`caffe_to_state`) follows the released prototxts: ResNet-101 ``conv1``,
``bn_conv1``/``scale_conv1``, ``res{2-5}{a,b,c,bN}_branch{1,2a,2b,2c}`` with ``bn``/``scale``
twins, the ASPP head ``fc1_<task>_c{0-3}``; VGG-16 ``conv1_1`` ... ``conv5_3``, ``fc6``/``fc7``/
``fc8_<task>`` (LargeFOV) or ``fc6_{1-4}``/``fc7_{1-4}``/``fc8_<task>_{1-4}`` (ASPP-L). Caffe's
``BatchNorm`` stores the running sums and their count: mean and variance are its blobs 0 and 1
divided by blob 2 (0 when blob 2 is 0, as ``batch_norm_layer.cpp``); a ``Scale`` layer after it
holds the affine weight and bias. A BN ``eps`` other than our 1e-5 is folded into the variance
(``var + eps_file - 1e-5``: the same function). The MSC training nets hold the layers of the
scaled inputs again (``<name>_res075``, ``<name>_res05``: the same parameters, shared in
Caffe): each copy must equal its original and is dropped. Classifiers of a pretraining task
(``fc1000`` of ImageNet, a COCO ``fc1*`` that is not the 4-branch ASPP) are dropped: such an
init file gives a backbone-only checkpoint (``backbone_only`` recorded), which trains
(``model.weights=``) but does not evaluate.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .model import build_model
from .model.deeplab import DEFAULT_RATES, LARGEFOV_RATES
from .model.vgg import _CFG as VGG_CFG
from .utils.digest import file_sha256
from .weights import LoadReport, WeightsError

#: V1LayerParameter.LayerType values of the layers that can hold blobs (caffe.proto)
V1_TYPES = {4: "Convolution", 14: "InnerProduct", 39: "Deconvolution", 5: "Data",
            17: "Pooling", 18: "ReLU", 6: "Dropout", 25: "Eltwise", 20: "Softmax",
            21: "SoftmaxWithLoss", 3: "Concat", 22: "Split", 1: "Accuracy"}
#: Caffe's default ``BatchNormParameter.eps``, also our ``FrozenBatchNorm2d``'s
CAFFE_BN_EPS = 1e-5
#: NetParameter fields (caffe.proto): number -> (name, wire type)
_NET_FIELDS = {1: ("name", 2), 2: ("layers", 2), 3: ("input", 2), 4: ("input_dim", None),
               5: ("force_backward", 0), 6: ("state", 2), 7: ("debug_info", 0),
               8: ("input_shape", 2), 100: ("layer", 2)}


@dataclass
class CaffeLayer:
    """One layer of a caffemodel: its name, type, blobs (float32 tensors in their stored shape)
    and the convolution geometry and BN eps the file records (None where it does not)."""

    name: str
    type: str
    blobs: list[torch.Tensor] = field(default_factory=list)
    conv: dict | None = None  # num_output, bias_term, kernel, pad, stride, dilation (as given)
    bn_eps: float | None = None


# -- the wire format ------------------------------------------------------------------------------
class _Bad(Exception):
    """A wire-format error at byte ``pos``; ``truncated`` when the file ends inside a field."""

    def __init__(self, pos: int, what: str, truncated: bool = False, number: int | None = None):
        super().__init__(what)
        self.pos, self.what, self.truncated, self.number = pos, what, truncated, number


class _Wire:
    """Reads fields of ``buf[start:end]``; positions are offsets into the whole file."""

    def __init__(self, buf: memoryview, start: int, end: int):
        self.buf, self.pos, self.end = buf, start, end

    def _need(self, n: int, what: str) -> None:
        if self.pos + n > self.end:
            short = self.end == len(self.buf)
            raise _Bad(self.pos, f"{what} runs past the end of "
                       f"{'the file' if short else 'its message'}", truncated=short)

    def varint(self) -> int:
        result = shift = 0
        while True:
            self._need(1, "a varint")
            b = self.buf[self.pos]
            self.pos += 1
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7
            if shift > 63:
                raise _Bad(self.pos, "a varint longer than 10 bytes")

    def fields(self):
        """Yield ``(number, wire_type, value)``: an int for varints and fixed32/64 (raw bits),
        ``(start, end)`` for length-delimited fields."""
        while self.pos < self.end:
            at = self.pos
            key = self.varint()
            number, wt = key >> 3, key & 7
            if number == 0:
                raise _Bad(at, "field number 0")
            if wt == 0:
                yield number, wt, self.varint()
            elif wt == 1:
                self._need(8, f"field {number}")
                self.pos += 8
                yield number, wt, int.from_bytes(self.buf[self.pos - 8:self.pos], "little")
            elif wt == 5:
                self._need(4, f"field {number}")
                self.pos += 4
                yield number, wt, int.from_bytes(self.buf[self.pos - 4:self.pos], "little")
            elif wt == 2:
                n = self.varint()
                try:
                    self._need(n, f"field {number} ({n} bytes)")
                except _Bad as e:
                    e.number = number  # which field: a layer's blob, ...
                    raise
                self.pos += n
                yield number, wt, (self.pos - n, self.pos)
            else:
                raise _Bad(at, f"invalid protobuf wire type {wt} (field {number})")

    def string(self, span) -> str:
        try:
            return bytes(self.buf[span[0]:span[1]]).decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad(span[0], "a string field that is not UTF-8") from None


def _packed(buf, at: int, wt: int, value, fmt: str) -> torch.Tensor:
    """The values of a repeated float (``fmt`` "<f") or double ("<d") field: a packed run
    (``value`` its span) or one unpacked element (``value`` its raw bits); ``at``: for errors."""
    size = struct.calcsize(fmt)
    if wt == 2:
        start, end = value
        if (end - start) % size:
            raise _Bad(start, f"a packed field of {end - start} bytes, not whole "
                       f"{size}-byte values")
        if end == start:
            return torch.zeros(0)
        # the wire format is little-endian, as torch.frombuffer reads on x86 and ARM
        values = torch.frombuffer(bytearray(buf[start:end]),
                                  dtype=torch.float32 if size == 4 else torch.float64)
        return values.float()
    if wt != (5 if size == 4 else 1):
        raise _Bad(at, f"a float field with wire type {wt}")
    return torch.tensor([struct.unpack(fmt, value.to_bytes(size, "little"))[0]],
                        dtype=torch.float32)


def _uints(w: _Wire, wt, value) -> list[int]:
    if wt == 0:
        return [value]
    if wt != 2:
        raise _Bad(w.pos, f"an integer field with wire type {wt}")
    inner = _Wire(w.buf, *value)
    out = []
    while inner.pos < inner.end:
        out.append(inner.varint())
    return out


def _blob(w: _Wire, start: int, end: int) -> torch.Tensor:
    inner = _Wire(w.buf, start, end)
    shape: list[int] | None = None
    legacy = [0, 0, 0, 0]
    data, double = [], []
    for number, wt, value in inner.fields():
        if number == 7 and wt == 2:  # BlobShape
            shape = []
            for n2, wt2, v2 in _Wire(w.buf, *value).fields():
                if n2 == 1:
                    shape += [d if d < 1 << 63 else d - (1 << 64) for d in _uints(inner, wt2, v2)]
        elif number in (1, 2, 3, 4) and wt == 0:
            legacy[number - 1] = value
        elif number == 5:
            data.append(_packed(w.buf, inner.pos, wt, value, "<f"))
        elif number == 8:
            double.append(_packed(w.buf, inner.pos, wt, value, "<d"))
    values = torch.cat(data) if data else (torch.cat(double).float() if double else torch.zeros(0))
    if shape is None:
        shape = legacy if any(legacy) else [values.numel()]
    if any(d < 0 for d in shape):
        raise _Bad(start, f"a negative blob dimension {tuple(shape)}")
    numel = 1
    for d in shape:
        numel *= d
    if numel != values.numel():
        raise _Bad(start, f"a blob of shape {tuple(shape)} holds {values.numel()} values, "
                   f"not {numel}")
    return values.reshape(shape)


def _conv_param(w: _Wire, start: int, end: int) -> dict:
    p = {"num_output": None, "bias_term": True, "kernel": [], "pad": [], "stride": [],
         "dilation": []}
    names = {3: "pad", 4: "kernel", 6: "stride", 18: "dilation"}
    for number, wt, value in _Wire(w.buf, start, end).fields():
        if number == 1:
            p["num_output"] = value
        elif number == 2:
            p["bias_term"] = bool(value)
        elif number in names:
            p[names[number]] += _uints(w, wt, value)
    return p


def _layer(w: _Wire, start: int, end: int, v1: bool, index: int, ctx: list) -> CaffeLayer:
    """One (V1)LayerParameter; ``ctx`` is filled with where the reader is (for errors)."""
    name_f, type_f, blobs_f, conv_f = (4, 5, 6, 10) if v1 else (1, 2, 7, 106)
    layer = CaffeLayer(name=f"#{index}", type="")
    ctx[:] = [f"layer #{index}"]
    inner = _Wire(w.buf, start, end)
    try:
        _layer_fields(inner, layer, v1, ctx, name_f, type_f, blobs_f, conv_f)
    except _Bad as e:
        if e.number == blobs_f and len(ctx) == 1:  # the blob the file ends in
            ctx.append(f"blob {len(layer.blobs)}")
        raise
    return layer


def _layer_fields(inner: _Wire, layer: CaffeLayer, v1: bool, ctx: list, name_f, type_f,
                  blobs_f, conv_f) -> None:
    for number, wt, value in inner.fields():
        if number == name_f and wt == 2:
            layer.name = inner.string(value)
            ctx[:] = [f"layer {layer.name!r}"]
        elif number == type_f:
            layer.type = (V1_TYPES.get(value, f"V1 type {value}") if v1 and wt == 0
                          else inner.string(value) if wt == 2 else f"type {value}")
        elif number == blobs_f and wt == 2:
            ctx[1:] = [f"blob {len(layer.blobs)}"]
            layer.blobs.append(_blob(inner, *value))
            ctx[1:] = []
        elif number == conv_f and wt == 2:
            layer.conv = _conv_param(inner, *value)
        elif number == 139 and not v1 and wt == 2:
            layer.bn_eps = CAFFE_BN_EPS
            for n2, wt2, v2 in _Wire(inner.buf, *value).fields():
                if n2 == 3 and wt2 == 5:
                    layer.bn_eps = struct.unpack("<f", v2.to_bytes(4, "little"))[0]


def read_caffemodel(path) -> list[CaffeLayer]:
    """The layers of a binary ``.caffemodel`` (``NetParameter``), in file order; a file that is
    not one, or is truncated, raises :class:`WeightsError` naming the file, the byte and the layer.
    """
    path = Path(path)
    if path.is_dir():
        raise WeightsError(f"{path}: is a folder, not a .caffemodel file")
    if not path.is_file():
        raise WeightsError(f"{path}: no such .caffemodel file")
    buf = memoryview(path.read_bytes())
    if not buf:
        raise WeightsError(f"{path}: empty file, not a .caffemodel")
    layers: list[CaffeLayer] = []
    ctx: list[str] = []
    w = _Wire(buf, 0, len(buf))
    try:
        while w.pos < w.end:
            at = w.pos
            key = w.varint()
            number, wt = key >> 3, key & 7
            known = _NET_FIELDS.get(number)
            if known is None or (known[1] is not None and known[1] != wt) or wt in (3, 4, 6, 7):
                why = (f"field {number} with wire type {wt}" if known is None or wt in (3, 4, 6, 7)
                       else f"field {number} ({known[0]}) with wire type {wt}")
                raise WeightsError(f"{path}: not a Caffe .caffemodel (NetParameter): {why} at "
                                   f"byte {at}, which NetParameter does not have (another "
                                   "protobuf, e.g. an ONNX model, or not a protobuf)")
            w.pos = at
            _, _, value = next(w.fields())
            if number in (2, 100):
                layers.append(_layer(w, *value, v1=number == 2, index=len(layers), ctx=ctx))
                ctx = []
    except _Bad as e:
        where = f" inside {' '.join(ctx)}" if ctx else ""
        if e.truncated:
            if not ctx:  # a layer's length runs past the end: read what there is of it
                where = _truncated_where(buf)
            raise WeightsError(f"{path}: truncated at byte {len(buf)}{where} (the file ends "
                               "there: an incomplete download or copy?)") from None
        raise WeightsError(f"{path}: not a valid .caffemodel: {e.what} at byte {e.pos}"
                           f"{where}") from None
    if not any(layer.blobs for layer in layers):
        what = (f"{len(layers)} layers, none with weights (a net definition, not trained "
                "weights)" if layers else "no layers (another protobuf, or not a protobuf)")
        raise WeightsError(f"{path}: not a Caffe .caffemodel with weights: {what}")
    return layers


def _truncated_where(buf: memoryview) -> str:
    """Where a file cut inside a top-level layer breaks: parse the layer's bytes up to the end of
    the file and report the last layer/blob reached."""
    w = _Wire(buf, 0, len(buf))
    index = 0
    while w.pos < len(buf):
        at = w.pos
        try:
            key = w.varint()
            length = w.varint() if key & 7 == 2 else None
        except _Bad:
            return ""
        if length is None:
            try:
                w.pos = at
                next(w.fields())
            except (_Bad, StopIteration):
                return ""
            continue
        start = w.pos
        if start + length <= len(buf):
            w.pos = start + length
            index += (key >> 3) in (2, 100)
            continue
        if (key >> 3) not in (2, 100):
            return ""
        ctx: list[str] = []
        try:
            _layer(_Wire(buf, start, len(buf)), start, len(buf), v1=(key >> 3) == 2,
                   index=index, ctx=ctx)
        except _Bad:
            pass
        return f" inside {' '.join(ctx)}" if ctx else ""
    return ""


# -- the mapping ----------------------------------------------------------------------------------
_RES = re.compile(r"^(res|bn|scale)([2-5])([a-z])(\d*)_branch(1|2a|2b|2c)$")
_RES_PART = {"1": ("downsample.0", "downsample.1"), "2a": ("conv1", "bn1"),
             "2b": ("conv2", "bn2"), "2c": ("conv3", "bn3")}
_ASPP = re.compile(r"^fc1_(?:\w+_)?c(\d)$")
_MSC = re.compile(r"^(.+)_res(\d+)$")
_VGG_HEAD = re.compile(r"^(fc6|fc7|fc8)(?:_([a-z]\w*?))?(?:_([1-9]))?$")


def _vgg_convs() -> dict[str, int]:
    """``conv{stage}_{i}`` -> index in :class:`~deeplabv2.model.vgg.VGG16` ``features``."""
    out, index, stage, i = {}, 0, 1, 1
    for item in VGG_CFG:
        if isinstance(item, str):
            index, stage, i = index + 1, stage + 1, 1
        else:
            out[f"conv{stage}_{i}"] = index
            index, i = index + 2, i + 1
    return out


VGG_CONVS = _vgg_convs()


def detect_arch(layers: list[CaffeLayer]) -> str:
    """``"resnet"``, ``"vgg16"`` (ASPP-L) or ``"vgg16_largefov"`` from the layer names."""
    names = {l.name for l in layers if l.blobs}
    if "conv1" in names and any(_RES.match(n) for n in names):
        return "resnet"
    if "conv1_1" in names:
        branches = {m.group(3) for n in names if (m := _VGG_HEAD.match(n)) and m.group(1) == "fc8"}
        return "vgg16_largefov" if branches <= {None} else "vgg16"
    raise WeightsError(f"neither a DeepLab ResNet (conv1, res2a_branch1, ...) nor a VGG-16 "
                       f"(conv1_1, ...): first layers with weights {sorted(names)[:4]}")


def _resnet_targets(name: str):
    """Model keys of a ResNet layer's blobs: ``[key, ...]`` (None: a blob not kept) and the
    conv module path for the geometry check, or None when the name is not a backbone layer."""
    if name == "conv1":
        return ["backbone.conv1.weight"], "backbone.conv1"
    if name == "bn_conv1":
        return ["backbone.bn1.running_mean", "backbone.bn1.running_var", None], None
    if name == "scale_conv1":
        return ["backbone.bn1.weight", "backbone.bn1.bias"], None
    m = _RES.match(name)
    if not m:
        return None
    kind, stage, letter, number, branch = m.groups()
    block = int(number) if number else ord(letter) - ord("a")
    conv, bn = _RES_PART[branch]
    prefix = f"backbone.layer{int(stage) - 1}.{block}."
    if kind == "res":
        return [prefix + conv + ".weight"], prefix + conv
    if kind == "bn":
        return [prefix + bn + ".running_mean", prefix + bn + ".running_var", None], None
    return [prefix + bn + ".weight", prefix + bn + ".bias"], None


@dataclass
class Converted:
    """What :func:`caffe_to_state` made of a caffemodel."""

    arch: str  # "resnet", "vgg16", "vgg16_largefov"
    config: dict  # the model config (deeplabv2.model.build_model)
    state: dict  # model key -> tensor (no head keys when backbone_only)
    backbone_only: bool
    report: LoadReport
    convs: dict  # caffe conv layer -> model conv module path (geometry checks)
    layers: list  # the CaffeLayers


def caffe_to_state(layers: list[CaffeLayer], source: str = "caffemodel", arch: str = "auto",
                   num_classes: int | None = None) -> Converted:
    """Map caffemodel layers onto a :class:`~deeplabv2.model.deeplab.DeepLabV2` state dict,
    strictly: every blob is loaded or dropped with a reason in the returned report, a shape
    mismatch names the layer and both shapes, a missing layer is named."""
    found = detect_arch(layers)
    if arch in ("resnet101", "resnet"):
        arch = "resnet"
    if arch not in ("auto", "resnet", "vgg16", "vgg16_largefov"):
        raise ValueError(f"arch={arch!r}; valid: auto, resnet101, vgg16, vgg16_largefov")
    if arch != "auto" and arch != found:
        what = {"resnet": "a ResNet's", "vgg16": "VGG-16 ASPP-L's (fc8_*_1..4)",
                "vgg16_largefov": "VGG-16 LargeFOV's (one fc8)"}[found]
        raise WeightsError(f"{source}: --arch {'resnet101' if arch == 'resnet' else arch}, but "
                           f"the file's layers are {what}")
    report = LoadReport(path=str(source), layout="caffemodel")
    by_name: dict[str, CaffeLayer] = {}
    for layer in layers:
        if layer.blobs:
            if layer.name in by_name:
                raise WeightsError(f"{source}: two layers named {layer.name!r} with weights")
            by_name[layer.name] = layer
    # MSC copies of the scaled inputs: equal to their original, dropped
    kept: dict[str, CaffeLayer] = {}
    for name, layer in by_name.items():
        m = _MSC.match(name)
        if m and m.group(1) in by_name:
            _same_blobs(source, layer, by_name[m.group(1)])
            for i in range(len(layer.blobs)):
                report.dropped[f"{name}/{i}"] = ("MSC branch copy of a shared layer "
                                                 "(checked equal to the original)")
        else:
            kept[name] = layer
    if found == "resnet":
        return _resnet(kept, source, report, num_classes, layers)
    return _vgg(kept, source, report, num_classes, found, layers)


def _same_blobs(source, copy: CaffeLayer, original: CaffeLayer) -> None:
    pairs = zip(copy.blobs, original.blobs)
    if len(copy.blobs) != len(original.blobs) or any(
            a.shape != b.shape or not torch.equal(a, b) for a, b in pairs):
        raise WeightsError(f"{source}: layer {copy.name!r} differs from {original.name!r}: the "
                           "MSC branches of a DeepLab net share their parameters, so these "
                           "should be equal copies")


def _fit(source, name, i, blob: torch.Tensor, shape) -> torch.Tensor:
    """``blob`` in ``shape``; Caffe's legacy 4-D blobs pad shapes with leading 1s."""
    def core(s):
        s = list(s)
        while s and s[0] == 1:
            s.pop(0)
        return s
    if tuple(blob.shape) != tuple(shape) and core(blob.shape) != core(shape):
        raise WeightsError(f"{source}: shape mismatch for layer {name!r} blob {i}: file "
                           f"{tuple(blob.shape)}, model {tuple(shape)}")
    return blob.reshape(shape).clone()


def _bn_stats(layer: CaffeLayer, eps: float | None) -> list[torch.Tensor]:
    """Caffe BatchNorm blobs -> (mean, var): sums divided by the count, ``eps`` folded in."""
    if len(layer.blobs) != 3:
        raise WeightsError(f"layer {layer.name!r} (BatchNorm) has {len(layer.blobs)} blobs, "
                           "expected 3 (mean, variance, scale factor)")
    factor = float(layer.blobs[2].reshape(-1)[0]) if layer.blobs[2].numel() else 0.0
    factor = 0.0 if factor == 0 else 1.0 / factor  # batch_norm_layer.cpp
    eps = CAFFE_BN_EPS if eps is None else eps
    mean = layer.blobs[0].double() * factor
    var = layer.blobs[1].double() * factor + (eps - CAFFE_BN_EPS)
    return [mean.float(), var.float()]


def _assign(state, report, source, name, blobs, keys, target, why_extra=None):
    if len(blobs) > len(keys):
        raise WeightsError(f"{source}: layer {name!r} has {len(blobs)} blobs, expected "
                           f"{len(keys)}")
    if len(blobs) < sum(k is not None for k in keys):
        missing = keys[len(blobs)]
        raise WeightsError(f"{source}: layer {name!r} has {len(blobs)} blobs: no "
                           f"{missing.rsplit('.', 1)[-1]} for {missing}")
    for i, (blob, key) in enumerate(zip(blobs, keys)):
        if key is None:
            report.dropped[f"{name}/{i}"] = why_extra or "BatchNorm scale factor (divided out)"
            continue
        state[key] = _fit(source, name, i, blob, target[key].shape)
        report.loaded[f"{name}/{i}"] = key


def _resnet(kept, source, report, num_classes, layers) -> Converted:
    stages = [0, 0, 0, 0]
    for name in kept:
        m = _RES.match(name)
        if m and m.group(1) == "res":
            s, letter, number = int(m.group(2)), m.group(3), m.group(4)
            stages[s - 2] = max(stages[s - 2], (int(number) if number else ord(letter) - 97) + 1)
    if "conv1" not in kept:
        raise WeightsError(f"{source}: missing layer 'conv1'")
    width = int(kept["conv1"].blobs[0].shape[0])
    aspp = {int(m.group(1)): l for n, l in kept.items() if (m := _ASPP.match(n))}
    classes = None
    if aspp:
        if sorted(aspp) != list(range(len(aspp))):
            raise WeightsError(f"{source}: ASPP branches c{sorted(aspp)} are not c0..c"
                               f"{len(aspp) - 1}")
        classes = int(aspp[0].blobs[0].shape[0])
        rates = [_dilation(aspp[k]) or DEFAULT_RATES[k] for k in sorted(aspp)]
    else:
        rates = list(DEFAULT_RATES)
    _check_classes(source, classes, num_classes)
    config = {"backbone": "resnet", "num_classes": classes or num_classes or 21,
              "atrous_rates": rates, "blocks": stages, "width": width, "bn": "frozen",
              "layout": "caffe"}
    model = build_model(config)
    target = model.state_dict()
    state, convs = {}, {}
    eps = {n: l.bn_eps for n, l in kept.items()}
    for name, layer in kept.items():
        mapped = _resnet_targets(name)
        if mapped is not None:
            keys, conv = mapped
            blobs = _bn_stats(layer, eps[name]) if keys[-1] is None else layer.blobs
            if keys[-1] is None:
                _assign(state, report, source, name, blobs, keys[:2], target)
                report.dropped[f"{name}/2"] = "BatchNorm scale factor (divided out)"
            else:
                _assign(state, report, source, name, blobs, keys, target)
            if conv:
                convs[name] = conv
        elif name in {n for n in kept if _ASPP.match(n)}:
            k = int(_ASPP.match(name).group(1))
            _assign(state, report, source, name, layer.blobs,
                    [f"head.convs.{k}.weight", f"head.convs.{k}.bias"], target)
            convs[name] = f"head.convs.{k}"
        elif name.startswith("fc"):
            for i in range(len(layer.blobs)):
                report.dropped[f"{name}/{i}"] = (
                    f"classifier of the pretraining task ({name!r}, {layer.type or '?'} "
                    f"{tuple(layer.blobs[0].shape)}), not DeepLab v2's ASPP head")
        else:
            raise WeightsError(f"{source}: layer {name!r} ({layer.type or '?'}) has no "
                               "counterpart in a DeepLab v2 ResNet")
    backbone_only = not aspp
    _check_missing(source, state, target, backbone_only)
    return Converted("resnet", dict(model.config), state, backbone_only, report, convs, layers)


def _vgg(kept, source, report, num_classes, arch, layers) -> Converted:
    heads: dict[tuple[str, int], CaffeLayer] = {}
    for name, layer in kept.items():
        m = _VGG_HEAD.match(name)
        if m:
            heads[(m.group(1), int(m.group(3) or 1) - 1)] = layer
    n = max((k for _, k in heads), default=0) + 1
    fc8 = [heads[("fc8", k)] for k in range(n) if ("fc8", k) in heads]
    if not fc8:
        raise WeightsError(f"{source}: no fc8 classifier: only VGG-16 DeepLab models trained "
                           "for a task (LargeFOV fc8_<task>, ASPP-L fc8_<task>_1..4) convert")
    classes = int(fc8[0].blobs[0].shape[0])
    _check_classes(source, classes, num_classes)
    default = LARGEFOV_RATES if n == 1 else DEFAULT_RATES
    rates = [_dilation(heads.get(("fc6", k))) or default[k] for k in range(n)]
    config = {"backbone": "vgg16", "num_classes": classes, "atrous_rates": rates}
    model = build_model(config)
    target = model.state_dict()
    state, convs = {}, {}
    for name, layer in kept.items():
        if name in VGG_CONVS:
            prefix = f"backbone.features.{VGG_CONVS[name]}"
        elif (m := _VGG_HEAD.match(name)):
            prefix = f"head.branches.{int(m.group(3) or 1) - 1}.{m.group(1)}"
            if prefix + ".weight" not in target:
                raise WeightsError(f"{source}: layer {name!r}: a {n}-branch head has no "
                                   f"branch {m.group(3)}")
        else:
            raise WeightsError(f"{source}: layer {name!r} ({layer.type or '?'}) has no "
                               "counterpart in a DeepLab v2 VGG-16")
        _assign(state, report, source, name, layer.blobs,
                [prefix + ".weight", prefix + ".bias"], target)
        convs[name] = prefix
    _check_missing(source, state, target, False)
    return Converted("vgg16_largefov" if n == 1 else "vgg16", dict(model.config), state, False,
                     report, convs, layers)


def _dilation(layer: CaffeLayer | None) -> int | None:
    if layer is None or not layer.conv or not layer.conv["dilation"]:
        return None
    return int(layer.conv["dilation"][0])


def _check_classes(source, classes, num_classes) -> None:
    if num_classes is not None and classes is not None and classes != num_classes:
        raise WeightsError(f"{source}: the file's classifier has {classes} classes, "
                           f"--num-classes says {num_classes}")


def _check_missing(source, state, target, backbone_only) -> None:
    for key in target:
        if key in state or (backbone_only and key.startswith("head.")):
            continue
        raise WeightsError(f"{source}: missing layer {_caffe_name(key)!r} (for {key})")


def _caffe_name(key: str) -> str:
    """The Caffe layer whose blob goes to model key ``key`` (for error messages)."""
    parts = key.split(".")
    if parts[0] == "backbone" and parts[1] in ("conv1", "bn1"):
        return {"conv1": "conv1", "bn1": "scale_conv1" if parts[2] in ("weight", "bias")
                else "bn_conv1"}[parts[1]]
    if parts[0] == "backbone" and parts[1].startswith("layer"):
        stage, block = int(parts[1][5:]) + 1, int(parts[2])
        blk = "a" if block == 0 else (f"b{block}" if stage in (3, 4) else chr(97 + block))
        mod = ".".join(parts[3:-1])
        branch = {"conv1": ("res", "2a"), "conv2": ("res", "2b"), "conv3": ("res", "2c"),
                  "downsample.0": ("res", "1"), "bn1": ("bn", "2a"), "bn2": ("bn", "2b"),
                  "bn3": ("bn", "2c"), "downsample.1": ("bn", "1")}[mod]
        kind = "scale" if branch[0] == "bn" and parts[-1] in ("weight", "bias") else branch[0]
        return f"{kind}{stage}{blk}_branch{branch[1]}"
    if parts[0] == "backbone" and parts[1] == "features":
        return next(n for n, i in VGG_CONVS.items() if i == int(parts[2]))
    if parts[0] == "head" and parts[1] == "convs":
        return f"fc1_*_c{parts[2]}"
    if parts[0] == "head" and parts[1] == "branches":
        return f"{parts[3]}_*{int(parts[2]) + 1}"
    return key


# -- geometry checks: the file's (or a prototxt's) convolution_param against the model ----------
def geometry_problems(convs: dict, conv_params: dict, model) -> list[str]:
    """One line per convolution whose kernel/stride/pad/dilation (``conv_params``: Caffe layer ->
    ``_conv_param`` dict) differs from the model's module; lists absent in Caffe mean 1 (0 for
    pad), as in caffe.proto."""
    modules = dict(model.named_modules())
    out = []
    for name, path in convs.items():
        p = conv_params.get(name)
        if not p:
            continue
        conv = modules[path]
        caffe = {"kernel": (p["kernel"] or [None])[0], "stride": (p["stride"] or [1])[0],
                 "pad": (p["pad"] or [0])[0], "dilation": (p["dilation"] or [1])[0]}
        ours = {"kernel": conv.kernel_size[0], "stride": conv.stride[0],
                "pad": conv.padding[0], "dilation": conv.dilation[0]}
        for k, v in caffe.items():
            if v is not None and v != ours[k]:
                out.append(f"layer {name!r}: {k} {v} in Caffe, {ours[k]} in the model ({path})")
        if p.get("num_output") is not None and p["num_output"] != conv.out_channels:
            out.append(f"layer {name!r}: num_output {p['num_output']}, the model's {path} has "
                       f"{conv.out_channels}")
    return out


# -- text prototxt --------------------------------------------------------------------------------
_TOKEN = re.compile(r'\s+|#[^\n]*|"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\''
                    r'|[{}:;,\[\]]|[^\s{}:;,\[\]"\'#]+')


def parse_prototxt(text: str, source: str = "prototxt") -> dict:
    """Protobuf text format -> ``{field: [value or dict, ...]}`` (every field a list, strings
    unquoted, numbers left as strings)."""
    tokens = [t for t in _TOKEN.findall(text) if t.strip() and not t.startswith("#")]
    pos = 0

    def message(end_token):
        nonlocal pos
        out: dict = {}
        while pos < len(tokens):
            t = tokens[pos]
            if t == end_token:
                pos += 1
                return out
            if t in (";", ","):
                pos += 1
                continue
            name = t
            pos += 1
            if pos < len(tokens) and tokens[pos] == ":":
                pos += 1
            if pos >= len(tokens):
                break
            if tokens[pos] == "{":
                pos += 1
                value = message("}")
            elif tokens[pos] == "[":
                raise WeightsError(f"{source}: list syntax [...] for {name!r} is not supported")
            else:
                value = tokens[pos]
                if value[:1] in "\"'":
                    value = value[1:-1]
                pos += 1
            out.setdefault(name, []).append(value)
        if end_token is not None:
            raise WeightsError(f"{source}: unbalanced braces: the file ends inside a message")
        return out

    return message(None)


def prototxt_layers(path) -> list[dict]:
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    net = parse_prototxt(text, str(path))
    layers = net.get("layer", []) + net.get("layers", [])
    if not layers:
        raise WeightsError(f"{path}: no layer {{ ... }} definitions (not a net prototxt)")
    return layers


def _first(d: dict, key, default=None):
    v = d.get(key)
    return v[0] if v else default


def prototxt_problems(path, converted: Converted, model) -> list[str]:
    """One line per disagreement between a net prototxt and the caffemodel: a layer with weights
    missing from either, a convolution's num_output/kernel/bias against its blobs, a BN eps
    other than the file's, a pooling other than max (e.g. an average ``pool5a``), and each
    convolution's geometry against the model."""
    out = []
    defs = {}
    for d in prototxt_layers(path):
        name = _first(d, "name")
        if name is not None:
            defs[name] = d
    with_blobs = {l.name: l for l in converted.layers if l.blobs}
    param_types = {"Convolution", "BatchNorm", "Scale", "InnerProduct", "CONVOLUTION",
                   "INNER_PRODUCT"}
    for name in with_blobs:
        if name not in defs:
            out.append(f"layer {name!r} of the caffemodel is not in the prototxt")
    for name, d in defs.items():
        if _first(d, "type") in param_types and name not in with_blobs:
            out.append(f"layer {name!r} ({_first(d, 'type')}) of the prototxt has no weights "
                       "in the caffemodel")
    params = {}
    for name, d in defs.items():
        cp = _first(d, "convolution_param")
        if cp is None or name not in with_blobs:
            continue
        p = {"num_output": int(_first(cp, "num_output", 0)) or None,
             "bias_term": str(_first(cp, "bias_term", "true")).lower() == "true",
             **{k: [int(v) for v in cp.get(f, [])] for k, f in
                (("kernel", "kernel_size"), ("pad", "pad"), ("stride", "stride"),
                 ("dilation", "dilation"))}}
        params[name] = p
        blobs = with_blobs[name].blobs
        w = blobs[0]
        if p["num_output"] is not None and w.shape[0] != p["num_output"]:
            out.append(f"layer {name!r}: num_output {p['num_output']} in the prototxt, blob 0 "
                       f"has shape {tuple(w.shape)}")
        if p["kernel"] and w.dim() == 4 and tuple(w.shape[2:]) != (p["kernel"][0],) * 2:
            out.append(f"layer {name!r}: kernel_size {p['kernel'][0]} in the prototxt, blob 0 "
                       f"has shape {tuple(w.shape)}")
        if len(blobs) != (2 if p["bias_term"] else 1):
            out.append(f"layer {name!r}: bias_term {str(p['bias_term']).lower()} in the "
                       f"prototxt, {len(blobs)} blobs in the caffemodel")
    for name, d in defs.items():
        bp = _first(d, "batch_norm_param")
        if bp is not None and name in with_blobs and _first(bp, "eps") is not None:
            eps = float(_first(bp, "eps"))
            recorded = with_blobs[name].bn_eps
            if recorded is not None and abs(recorded - eps) > 1e-12 + 1e-6 * eps:
                out.append(f"layer {name!r}: eps {eps} in the prototxt, {recorded} in the "
                           "caffemodel")
    for name, d in defs.items():  # no blobs, so only a prototxt can show them
        pp = _first(d, "pooling_param")
        if pp is not None and str(_first(pp, "pool", "MAX")).upper() != "MAX":
            out.append(f"layer {name!r}: {_first(pp, 'pool')} pooling, which the model does "
                       "not have (its pools are max pools)")
    out += geometry_problems(converted.convs, params, model)
    return out


# -- the command ----------------------------------------------------------------------------------
def convert_caffemodel(path, out=None, *, arch: str = "auto", prototxt=None,
                       num_classes: int | None = None, classes=None):
    """Convert ``path`` (a ``.caffemodel``) into this project's checkpoint ``out`` (``.pth`` or
    ``.safetensors``; default: ``path`` with ``.pth``). Returns ``(model, report, out)``.

    ``arch``: ``"auto"`` (from the layer names), ``"resnet101"``, ``"vgg16"`` (ASPP-L) or
    ``"vgg16_largefov"``. ``prototxt``: a net definition checked against the file (every layer
    with weights, each convolution's blobs and geometry); a disagreement raises
    :class:`WeightsError` listing one per line. ``classes``: the class names (default: VOC
    2012's for 21 classes). A file whose head is not DeepLab v2's (an init file) gives a
    backbone-only checkpoint; its ``model_config`` then records ``num_classes`` (default 21),
    which only a model built from that config uses.
    """
    from .model.preprocessing import CAFFE_BGR
    from .weights import save_weights
    path = Path(path)
    layers = read_caffemodel(path)
    conv = caffe_to_state(layers, str(path), arch, num_classes)
    model = build_model(conv.config)
    problems = geometry_problems(conv.convs, {l.name: l.conv for l in layers if l.conv}, model)
    if problems:
        raise WeightsError(f"{path}: the convolutions the file records differ from the "
                           f"model:\n" + "\n".join(problems))
    if prototxt is not None:
        problems = prototxt_problems(prototxt, conv, model)
        if problems:
            raise WeightsError(f"{prototxt}: {len(problems)} disagreement(s) with {path}:\n"
                               + "\n".join(problems))
    target = model.state_dict()
    with torch.no_grad():
        for k, v in conv.state.items():
            target[k].copy_(v)
    model.preprocessing = CAFFE_BGR
    n = model.num_classes
    if classes is not None and len(classes) != n:
        raise WeightsError(f"{path}: {len(classes)} class names given for {n} classes")
    if classes is None and n == 21 and not conv.backbone_only:
        from .data.voc import CLASSES as VOC
        classes = list(VOC)
    report = conv.report
    total = sum(len(l.blobs) for l in layers)
    assert len(report.loaded) + len(report.dropped) == total, (len(report.loaded), total)
    report.alignment = "caffe"
    report.preprocessing = CAFFE_BGR
    report.head_loaded = not conv.backbone_only
    if conv.backbone_only:
        report.notes.append("no DeepLab v2 head in the file: a backbone-only checkpoint "
                            "(train from it with model.weights=...; it cannot evaluate)")
    out = Path(out) if out is not None else path.with_suffix(".pth")
    provenance = {"source": path.name, "sha256": file_sha256(path), "converter":
                  "deeplabv2 convert", "arch": conv.arch}
    save_weights(model, out, classes=classes, provenance=provenance,
                 backbone_only=conv.backbone_only)
    return model, report, out
