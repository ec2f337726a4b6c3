"""`promptkd compare`: a method comparison study over training seeds.

`promptkd.compare.stats` holds its statistics (paired t-tests over seeds, Holm, TOST).
"""
