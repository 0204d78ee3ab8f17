"""The project's words, each defined once: the classes, the split kinds, the default seed.

Labels are ``1 = COVID`` (the positive class in every metric) and ``0 = non-COVID``; the
paper used the opposite integers.
"""

from __future__ import annotations

CLASS_NAMES = ("non-COVID", "COVID")  # as folders and tables spell them; index == integer label
POSITIVE_CLASS = "COVID"
# As maps, CLI flags and the explorer spell a class -> its integer label.
CLASS_KEYS = {"covid": 1, "non-covid": 0}
# The study's splits. random: slices shuffled, the paper's protocol; scan: segments of consecutively
# numbered look-alike slices (one scan each, as far as the pixels tell; data/scans.py) kept whole,
# the patient proxy.
SPLIT_KINDS = ("random", "scan")
# What a split can be made as (make_split, make_kfold, `covidlib data split --kind`): the study's kinds
# and grouped: near-duplicate slices (perceptual hash) kept on one side, the validity chapter's appendix.
SPLIT_CHOICES = (*SPLIT_KINDS, "grouped")
DEFAULT_SEED = 42
SEED_RANGE = (0, 2**31 - 1)  # what every --seed flag and RunConfig accept
