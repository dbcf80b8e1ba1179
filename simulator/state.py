"""Per-request state as a struct of arrays (the hot path touches arrays, not objects).

Index ``i`` is the request's row in the (arrival-sorted) trace. All times are simulated seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simspec.trace import Trace


@dataclass
class RequestTable:
    """Static request attributes plus mutable progress, one array entry per request.

    Static: ``arrival_s``, ``prompt_tokens``, ``output_tokens``, ``class_idx`` (index into
    ``class_names``), ``alpha`` (the request's own per-token acceptance level, drawn at arrival).
    Progress: ``generated`` (tokens committed so far), ``kv_resident`` (its KV is in the cache),
    ``in_batch`` (was in its replica's last step), ``start_s`` (first scheduled, NaN before),
    ``first_token_s``, ``completion_s`` (NaN until then), ``steps``, ``decode_steps``,
    ``drafted``, ``accepted`` (accepted prefix), ``position_accepts`` (drafted positions whose own
    draw was accepted, prefix or not: SmartSpec's per-position counter), ``replica``.

    Engine (vLLM-style) state: ``prefill_target`` (tokens to compute before the next token can be
    sampled: the prompt, or prompt + generated after a recompute preemption), ``computed`` (of
    those, already computed: chunked prefill progress), ``kv_tokens`` (KV slots allocated,
    tokens) and ``kv_blocks`` (blocks held). ``draws`` counts the request's counter-based random
    draws (see :func:`simspec.rng.counter_uniforms`), ``rng_base`` is its stream state.

    Accounting: ``pauses`` (steps a request holding KV sat out of its replica's batch),
    ``preemptions`` (its KV was freed while unfinished: vLLM's meaning), ``recomputes`` (of those,
    resumed by re-prefilling) and ``recomputed_tokens`` (tokens prefilled again because of them).
    """

    request_id: np.ndarray
    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    class_idx: np.ndarray
    class_names: list[str]
    slo_class: np.ndarray
    alpha: np.ndarray
    generated: np.ndarray
    kv_resident: np.ndarray
    in_batch: np.ndarray
    start_s: np.ndarray
    first_token_s: np.ndarray
    completion_s: np.ndarray
    steps: np.ndarray
    decode_steps: np.ndarray
    drafted: np.ndarray
    accepted: np.ndarray
    preemptions: np.ndarray
    recomputes: np.ndarray
    replica: np.ndarray
    position_accepts: np.ndarray
    prefill_target: np.ndarray
    computed: np.ndarray
    kv_tokens: np.ndarray
    kv_blocks: np.ndarray
    pauses: np.ndarray
    recomputed_tokens: np.ndarray
    draws: np.ndarray
    rng_base: np.ndarray

    @classmethod
    def from_trace(cls, trace: Trace) -> "RequestTable":
        n = len(trace)
        class_names = sorted(set(trace.acceptance_class.tolist()))
        lookup = {c: i for i, c in enumerate(class_names)}
        class_idx = np.fromiter((lookup[c] for c in trace.acceptance_class), dtype=np.int64, count=n)
        nan = np.full(n, np.nan)
        zeros = np.zeros(n, dtype=np.int64)
        return cls(
            request_id=trace.request_id, arrival_s=trace.arrival_s.astype(np.float64),
            prompt_tokens=trace.prompt_tokens.astype(np.int64),
            output_tokens=trace.output_tokens.astype(np.int64), class_idx=class_idx,
            class_names=class_names, slo_class=trace.slo_class, alpha=np.zeros(n),
            generated=zeros.copy(), kv_resident=np.zeros(n, dtype=bool), in_batch=np.zeros(n, dtype=bool),
            start_s=nan.copy(), first_token_s=nan.copy(), completion_s=nan.copy(), steps=zeros.copy(),
            decode_steps=zeros.copy(), drafted=zeros.copy(), accepted=zeros.copy(),
            preemptions=zeros.copy(), recomputes=zeros.copy(), replica=np.full(n, -1, dtype=np.int64),
            position_accepts=zeros.copy(), prefill_target=trace.prompt_tokens.astype(np.int64).copy(),
            computed=zeros.copy(), kv_tokens=zeros.copy(), kv_blocks=zeros.copy(), pauses=zeros.copy(),
            recomputed_tokens=zeros.copy(), draws=np.zeros(n, dtype=np.uint64), rng_base=np.zeros(n, dtype=np.uint64),
        )

    def __len__(self) -> int:
        return int(self.arrival_s.shape[0])

    def remaining(self, idx: np.ndarray) -> np.ndarray:
        """Output tokens still to generate for requests ``idx``."""
        return self.output_tokens[idx] - self.generated[idx]

    def context_tokens(self, idx: np.ndarray) -> np.ndarray:
        """Tokens of context (prompt + generated) of requests ``idx``."""
        return self.prompt_tokens[idx] + self.generated[idx]
