"""What a network is asked at test time: class probabilities of preprocessed images.

* :mod:`.front`: every test-time mode as a value (:class:`InferenceConfig`: whole image or
  sliding windows, the paper's MSC, averaged scales, flip), :func:`infer`, which turns a batch
  into class probabilities, and :func:`segment`, the front of every command: images ->
  probabilities -> the optional dense CRF -> labels;
* :mod:`.crf`: the fully connected CRF;
* :mod:`.ensemble`: several networks averaged, one network to everything above;
* :mod:`.predict`: image files in, label/colour/overlay files out.

How a network *runs* (device, precision, runtime) is :mod:`deeplabv2.deploy`'s business.
"""

from .front import InferenceConfig, Segmentation, infer, predict_probs, segment

__all__ = ["InferenceConfig", "Segmentation", "infer", "predict_probs", "segment"]
