"""`promptkd compare`: a method comparison study over training seeds (docs/compare.md).

`config` reads the study's YAML file, `runner` trains and evaluates its cells (arm x training
seed) over sittings, `report` writes report.md and plots from the cell files, and `stats` holds
the statistics (paired t-tests over seeds, Holm, TOST).
"""
