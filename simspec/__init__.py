"""simspec: a discrete-event simulator for speculative-decoding LLM serving schedulers.

Subpackages (each a top-level folder of the repository):

- ``simspec.simulator``  SimPy cluster model (no torch).
- ``simspec.policies``   request schedulers and speculation-length policies.
- ``simspec.traces``     trace formats, synthetic workloads, bundled samples.
- ``simspec.calibrate``  torch + transformers profiling (imported only by ``simspec calibrate``).
"""

__version__ = "0.1.0"
