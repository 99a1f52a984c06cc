"""Plumbing that knows nothing of segmentation: atomic file writes and run locks
(:mod:`.fileio`), content digests (:mod:`.digest`), process groups (:mod:`.distributed`) and
label colouring (:mod:`.visualize`). Nothing here imports from the rest of the package."""
