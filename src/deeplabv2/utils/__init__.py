"""Plumbing that knows nothing of segmentation: atomic file writes and run locks
(:mod:`.fileio`), content digests (:mod:`.digest`), process groups (:mod:`.distributed`),
label colouring (:mod:`.visualize`) and a training run's log (:mod:`.logger`). Nothing here
imports from the rest of the package."""
