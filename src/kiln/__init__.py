"""kiln: from a Hydra config to a trained, tested and verified model.

Importing `kiln` is cheap on purpose (no torch): `kiln --help` must answer in well under a second.
"""

__version__ = "0.1.0"
