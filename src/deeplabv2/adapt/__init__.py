"""Unsupervised domain adaptation on the DeepLab v2 network: each published method as a small
part that plugs into the one training loop (:mod:`deeplabv2.train`).

* :mod:`.discriminator`: AdaptSegNet's fully convolutional discriminator and its BCE terms;
* :mod:`.entropy`: ADVENT's entropy and weighted self-information maps, FDA's Charbonnier
  entropy;
* :mod:`.fda`: FDA's low-frequency amplitude swap;
* :mod:`.mix`: DACS's ClassMix, EMA teacher, confidence-weighted pseudo-labels and strong
  augmentation;
* :mod:`.self_training`: the self-training core shared by DACS and DAFormer's strategy
  (pseudo-labels with the confidence share and margins) and DAFormer's thing-class ImageNet
  feature distance; :class:`.methods.SelfTraining` puts them on the loop.
"""
