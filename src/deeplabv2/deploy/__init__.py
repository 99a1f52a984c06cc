"""How a network runs, and how fast: the runtimes, the one place that chooses among them, and
the measurements.

* :mod:`deeplabv2.deploy.runtime`: :func:`~deeplabv2.deploy.runtime.prepare_network`, the one
  place that prepares a network for a device, precision and runtime (and the commands' flags);
* :mod:`deeplabv2.deploy.fast` and :mod:`deeplabv2.deploy.atrous`: the BN-folded, fused,
  channels-last PyTorch copy, in fp32/bf16/fp16, with Winograd atrous convolutions;
* :mod:`deeplabv2.deploy.openvino_runtime`: the BN-folded network converted to OpenVINO IR
  (cached beside the checkpoint), compiled at the size it runs, wrapped as a module that
  ``evaluate``/``predict``/MSC/sliding windows call like the PyTorch one
  (``--runtime openvino``);
* :mod:`deeplabv2.deploy.quantize`: static INT8 post-training quantization with NNCF
  (``deeplabv2 quantize``, ``--precision int8``);
* :mod:`deeplabv2.deploy.export` and :mod:`deeplabv2.deploy.onnxruntime_runtime`: ONNX and
  TorchScript files (``deeplabv2 export``), and the ONNX file in ONNX Runtime (a peer);
* :mod:`deeplabv2.deploy.bench` (``deeplabv2 bench``): speed per mode (:mod:`.modes`), with the
  memory (:mod:`.memory`) and the machine (:mod:`.machine`); :mod:`deeplabv2.deploy.accuracy`:
  what each mode costs in accuracy.

OpenVINO and NNCF come with the optional extra ``openvino`` (``pip install
'deeplabv2[openvino]'``).
"""
