"""A small *encoder* of Caffe's binary ``NetParameter`` for the converter's tests, written from
caffe.proto (BVLC ``src/caffe/proto/caffe.proto``), independent of ``deeplabv2.caffe``'s reader:
it writes the bytes Caffe's ``WriteProtoToBinaryFile`` writes (fields in number order, packed
repeated floats and int64 dims).

Also the real layer names of the released DeepLab v2 nets (ResNet-101 ``train.prototxt`` of
``deeplab_aspp_resnet101``, VGG-16 LargeFOV and ASPP-L) with random blobs, and their text
prototxts.
"""

from __future__ import annotations

import struct

import torch

CONVOLUTION, INNER_PRODUCT = 4, 14  # V1LayerParameter.LayerType


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def key(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def ld(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return key(number, 2) + varint(len(payload)) + payload


def vint(number: int, value: int) -> bytes:
    return key(number, 0) + varint(value)


def blob(t: torch.Tensor, legacy: bool = False, double: bool = False,
         unpacked: bool = False) -> bytes:
    """BlobProto: shape 7 (BlobShape.dim 1, packed int64) or legacy num/channels/height/width
    1-4 (padded with leading 1s to 4-D); data 5 (packed float) or double_data 8 (packed double);
    ``unpacked``: one fixed32 field per float (what old writers did)."""
    out = b""
    if legacy:
        dims = [1] * (4 - t.dim()) + list(t.shape)
        out += b"".join(vint(i + 1, d) for i, d in enumerate(dims))
    if double:
        data = ld(8, t.detach().double().contiguous().numpy().tobytes())
    elif unpacked:
        data = b"".join(key(5, 5) + struct.pack("<f", v) for v in t.reshape(-1).tolist())
    else:
        data = ld(5, t.detach().float().contiguous().numpy().tobytes())
    if legacy:
        return out + data
    shape = ld(7, ld(1, b"".join(varint(d) for d in t.shape)))
    return shape + data if double else data + shape  # fields in number order: 5, 7, 8


def conv_param(num_output, kernel, stride=1, pad=0, dilation=1, bias=True) -> bytes:
    out = vint(1, num_output)
    if not bias:
        out += vint(2, 0)
    out += vint(3, pad) + vint(4, kernel)
    if stride != 1:
        out += vint(6, stride)
    if dilation != 1:
        out += vint(18, dilation)
    return out


def layer(name: str, type_: str, blobs=(), conv: bytes | None = None, bn_eps=None,
          v1: bool = False, legacy: bool = False) -> bytes:
    """LayerParameter (name 1, type 2, blobs 7, convolution_param 106, batch_norm_param 139)
    or V1LayerParameter (name 4, type 5 enum, blobs 6, convolution_param 10)."""
    encoded = [blob(b, legacy=legacy) for b in blobs]
    if v1:
        enum = {"Convolution": CONVOLUTION, "InnerProduct": INNER_PRODUCT}.get(type_, 18)
        out = ld(4, name.encode()) + vint(5, enum) + b"".join(ld(6, b) for b in encoded)
        return out + (ld(10, conv) if conv is not None else b"")
    out = ld(1, name.encode()) + ld(2, type_.encode()) + b"".join(ld(7, b) for b in encoded)
    if conv is not None:
        out += ld(106, conv)
    if type_ == "BatchNorm":
        bn = vint(1, 1)  # use_global_stats: true
        if bn_eps is not None:
            bn += key(3, 5) + struct.pack("<f", bn_eps)
        out += ld(139, bn)
    return out


def net(layers: list[bytes], v1: bool = False, name: str = "deeplab") -> bytes:
    """NetParameter: name 1, then each layer as field 100 (or 2 for V1)."""
    return ld(1, name.encode()) + b"".join(ld(2 if v1 else 100, l) for l in layers)


# -- the released nets, as (name, type, blobs, geometry) -----------------------------------------
def _w(*shape, gen, std=None):
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    return torch.randn(*shape, generator=gen) * (std if std is not None else (1.0 / fan_in) ** 0.5)


def resnet_layers(width=4, blocks=(3, 4, 23, 3), classes=21, rates=(6, 12, 18, 24), seed=0,
                  head="fc1_voc12_c{}", numbered=(False, True, True, False)):
    """The parameter layers of DeepLab v2 ResNet-101 (MSRA names) with random blobs:
    ``[(name, type, blobs, geometry)]``, geometry ``(kernel, stride, pad, dilation, bias)`` for
    convolutions. Caffe BN blobs are (sum-scaled) mean, variance and the scale factor.
    ``numbered``: per stage, blocks after the first named b1, b2, ... (ResNet-101's res3 and res4)
    rather than b, c, d, ... (``head=None``: no head, as an ImageNet init file)."""
    g = torch.Generator().manual_seed(seed)
    out = []

    def conv(name, cout, cin, k, stride=1, pad=0, dilation=1):
        out.append((name, "Convolution", [_w(cout, cin, k, k, gen=g)],
                    (k, stride, pad, dilation, False)))

    def bn(suffix, c):
        factor = float(torch.randint(1, 1000, (1,), generator=g))
        mean = torch.randn(c, generator=g) * 0.1
        var = torch.rand(c, generator=g) * 0.5 + 0.5
        out.append((f"bn{suffix}", "BatchNorm", [mean * factor, var * factor,
                                                   torch.tensor([factor])], None))
        out.append((f"scale{suffix}", "Scale", [torch.rand(c, generator=g) * 0.5 + 0.5,
                                                 torch.randn(c, generator=g) * 0.1], None))

    conv("conv1", width, 3, 7, 2, 3)
    bn("_conv1", width)
    cin = width
    for s, n in enumerate(blocks):
        stage = s + 2
        planes = width * 2 ** s
        stride = 2 if stage == 3 else 1
        dil = {4: 2, 5: 4}.get(stage, 1)
        for b in range(n):
            letter = "a" if b == 0 else (f"b{b}" if numbered[s] else "abcdefghij"[b])
            name = f"{stage}{letter}"
            if b == 0:
                conv(f"res{name}_branch1", planes * 4, cin, 1, stride)
                bn(f"{name}_branch1", planes * 4)
            conv(f"res{name}_branch2a", planes, cin, 1, stride if b == 0 else 1)
            bn(f"{name}_branch2a", planes)
            conv(f"res{name}_branch2b", planes, planes, 3, 1, dil, dil)
            bn(f"{name}_branch2b", planes)
            conv(f"res{name}_branch2c", planes * 4, planes, 1)
            bn(f"{name}_branch2c", planes * 4)
            cin = planes * 4
    for k, r in enumerate(rates if head else ()):
        out.append((head.format(k), "Convolution",
                    [_w(classes, cin, 3, 3, gen=g), torch.randn(classes, generator=g) * 0.1],
                    (3, 1, r, r, True)))
    return out


def vgg_layers(rates=(6, 12, 18, 24), classes=21, seed=0, largefov=False):
    """DeepLab v2 VGG-16: conv1_1 ... conv5_3 (conv5 dilated 2), then per branch fc6 (3x3,
    dilation r, 1024), fc7 (1x1, 1024), fc8_voc12 (1x1, classes); ASPP-L suffixes _1.._4,
    LargeFOV (``largefov``) none."""
    g = torch.Generator().manual_seed(seed)
    out = []
    cin = 3
    for stage, (n, c) in enumerate([(2, 64), (2, 128), (3, 256), (3, 512), (3, 512)], start=1):
        for i in range(1, n + 1):
            d = 2 if stage == 5 else 1
            out.append((f"conv{stage}_{i}", "Convolution",
                        [_w(c, cin, 3, 3, gen=g), torch.randn(c, generator=g) * 0.05],
                        (3, 1, d, d, True)))
            cin = c
    for k, r in enumerate(rates):
        sfx = "" if largefov else f"_{k + 1}"
        out.append((f"fc6{sfx}", "Convolution", [_w(1024, 512, 3, 3, gen=g),
                    torch.randn(1024, generator=g) * 0.05], (3, 1, r, r, True)))
        out.append((f"fc7{sfx}", "Convolution", [_w(1024, 1024, 1, 1, gen=g),
                    torch.randn(1024, generator=g) * 0.05], (1, 1, 0, 1, True)))
        out.append((f"fc8_voc12{sfx}", "Convolution", [_w(classes, 1024, 1, 1, gen=g),
                    torch.randn(classes, generator=g) * 0.05], (1, 1, 0, 1, True)))
    return out


def encode(layers, v1=False, legacy=False, msc=False, blobless=True, bn_eps=None) -> bytes:
    """The caffemodel bytes of ``layers`` (from :func:`resnet_layers`/:func:`vgg_layers`);
    ``msc``: every layer again as ``_res075`` and ``_res05`` copies (the MSC train net);
    ``blobless``: data/ReLU/Interp layers without blobs in between, as a saved net has."""
    encoded = []
    if blobless:
        encoded.append(layer("data", "ImageData", v1=v1))
    for name, type_, blobs, geo in layers:
        conv = None
        if geo is not None:
            k, s, p, d, bias = geo
            conv = conv_param(blobs[0].shape[0], k, s, p, d, bias)
        encoded.append(layer(name, type_, blobs, conv, bn_eps=bn_eps, v1=v1, legacy=legacy))
        if blobless and type_ == "Scale":
            encoded.append(layer(name.replace("scale", "relu"), "ReLU", v1=v1))
    if msc:
        for sfx in ("_res075", "_res05"):
            encoded.append(layer("data" + sfx, "Interp"))
            for name, type_, blobs, geo in layers:
                encoded.append(layer(name + sfx, type_, blobs, bn_eps=bn_eps))
        encoded.append(layer("fc1_voc12", "Eltwise"))
    return net(encoded, v1=v1)


def prototxt(layers) -> str:
    """The text prototxt of ``layers`` (parameter layers with their geometry)."""
    out = ['name: "deeplab"', 'layer { name: "data" type: "ImageData" top: "data" }']
    for name, type_, blobs, geo in layers:
        body = f'name: "{name}" type: "{type_}" bottom: "x" top: "{name}"'
        if geo is not None:
            k, s, p, d, bias = geo
            body += (f"\n  param {{ lr_mult: 1 }}\n  convolution_param {{ num_output: "
                     f"{blobs[0].shape[0]} kernel_size: {k} pad: {p} stride: {s}"
                     + (f" dilation: {d}" if d != 1 else "")
                     + ("" if bias else " bias_term: false") + " }")
        if type_ == "BatchNorm":
            body += "\n  batch_norm_param { use_global_stats: true }  # frozen"
        out.append("layer {\n  " + body + "\n}")
    return "\n".join(out) + "\n"
