"""`promptkd compare`: a method comparison study over training seeds (docs/compare.md).

`config` reads the study's YAML file, `runner` trains its prepare stages and trains and
evaluates its cells (arm x training seed) over sittings, `seqkd` makes a SeqKD cell's teacher
responses, `plan` estimates how long cells take (`--plan`), `report` writes report.md and plots
from the cell files, and `stats` holds the statistics (paired t-tests over seeds, Holm, TOST).
"""
