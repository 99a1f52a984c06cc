"""How good the labels are: the one confusion matrix (:mod:`.metrics`), a network evaluated on a
dataset (:mod:`.evaluate`, also the CRF parameter search) and a folder of predictions scored
against a dataset's labels (:mod:`.score`)."""
