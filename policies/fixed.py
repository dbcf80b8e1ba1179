"""Fixed speculation length: every decode request gets the method's k (``draft:k=4`` → 4), capped
so that it never drafts past its last needed token (k ≤ remaining − 1). ``k`` may be overridden
with ``--spec-len fixed:k=N`` (N ≤ the method's k)."""

from __future__ import annotations

import numpy as np

from simspec.errors import ConfigError
from simspec.policies.base import PolicyContext, SpecLenPolicy, register_spec_len


@register_spec_len("fixed")
class FixedK(SpecLenPolicy):
    param_defaults = {"k": -1}
    batch_independent = True
    constant_k = True

    def __init__(self, params, ctx: PolicyContext):
        super().__init__(params, ctx)
        k = self.params["k"]
        if k == -1:
            k = self.method.default_k
        if not isinstance(k, int) or k < 0 or k > self.method.k_max:
            raise ConfigError(f"--spec-len fixed: k must be an integer in 0..{self.method.k_max} "
                              f"for --spec {self.method.name}, got {k!r}")
        self.k = k

    def k_reserve(self) -> int:
        return self.k

    def choose_k(self, idx, kv_tokens, kv_free_tokens, step_index):
        return np.full(idx.shape[0], self.k, dtype=np.int64)
