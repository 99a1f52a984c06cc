"""Inference on other runtimes: OpenVINO (FP32, bf16) and INT8 post-training quantization.

* :mod:`deeplabv2.deploy.openvino_runtime`: the BN-folded network converted to OpenVINO IR
  (cached beside the checkpoint), compiled at the size it runs, wrapped as a module that
  ``evaluate``/``predict``/MSC/sliding windows call like the PyTorch one
  (``--runtime openvino``);
* :mod:`deeplabv2.deploy.quantize`: static INT8 post-training quantization with NNCF
  (``deeplabv2 quantize``, ``--precision int8``).

Both need the optional extra ``openvino`` (``pip install 'deeplabv2[openvino]'``).
"""
