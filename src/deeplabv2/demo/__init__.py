"""The demos of ``make demo`` and ``make demo-adapt``: a run on the embedded synthetic scenes from
training to report (:mod:`.supervised`), the adaptation methods side by side (:mod:`.adapt`),
their matplotlib charts (:mod:`.charts`) and the colour-only baseline that shows what the
network learnt beyond colour (:mod:`.colour_baseline`)."""
