"""The SimPy cluster model. Importing this package never imports torch or transformers.

Entry point: :func:`simspec.simulator.run.simulate` (config + trace + profile → result tables).
"""

from simspec.simulator.config import RunConfig

__all__ = ["RunConfig"]
