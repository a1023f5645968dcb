"""Synthetic data, one home: `shapes` (coloured shapes videos with exact masks, NL-Refer-style records and
benchmarks), `videorefer` (the same scenes in the raw VideoRefer formats), `klal` (KLAL's image tasks); `cli` is
``swim data synth``. `videorefer` and `klal` build on `shapes`; nothing here imports `cli`."""
