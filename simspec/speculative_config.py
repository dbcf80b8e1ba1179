"""vLLM's ``--speculative-config`` (the JSON object ``vllm serve`` takes) → a simspec ``--spec``.

Fields read (vLLM ``vllm/config/speculative.py``, ``SpeculativeConfig``):

- ``method``: ``eagle``, ``eagle3``, ``medusa``, ``ngram``, ``mtp`` (and the model-specific MTP
  names vLLM accepts, e.g. ``deepseek_mtp``, ``qwen3_next_mtp``: all → ``mtp``), ``draft_model``
  (→ ``draft``; also when ``method`` is absent and ``model`` is given, as vLLM infers it);
- ``num_speculative_tokens`` → the method's depth (``draft``: ``k``);
- ``model``: the drafter's checkpoint. Accepted, not interpreted: the drafter's cost and acceptance
  are the profile's (``draft_step`` / ``<method>_head`` stages, ``acceptance.<method>``).

SGLang's tree knobs are accepted under their SGLang names (vLLM expresses trees with
``speculative_token_tree``, which is not modelled): ``speculative_eagle_topk`` → ``topk``,
``speculative_num_draft_tokens`` → ``tokens``, ``speculative_num_steps`` (= depth; must agree with
``num_speculative_tokens`` if both are given). Every other field — e.g. ``prompt_lookup_max``,
``draft_tensor_parallel_size``, ``disable_by_batch_size``, ``speculative_token_tree`` — is refused
with a one-line error naming it: simspec would otherwise silently run something else.
"""

from __future__ import annotations

import json
from typing import Any

from simspec.errors import ConfigError

FLAG = "--speculative-config"
METHOD_MAP = {"eagle": "eagle", "eagle3": "eagle3", "medusa": "medusa", "ngram": "ngram", "mtp": "mtp",
              "deepseek_mtp": "mtp", "qwen3_next_mtp": "mtp", "mimo_mtp": "mtp", "glm4_moe_mtp": "mtp",
              "ernie_mtp": "mtp", "draft_model": "draft"}
TREE_METHODS = ("eagle", "eagle3", "mtp", "medusa")
KNOWN = ("method", "num_speculative_tokens", "model", "speculative_eagle_topk", "speculative_num_draft_tokens",
         "speculative_num_steps")


def _int(field: str, v: Any, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ConfigError(f"{FLAG}: field {field}: expected an integer >= {lo}, got {v!r}")
    return v


def spec_from_speculative_config(value: str | dict[str, Any]) -> str:
    """The ``--spec`` string for a vLLM speculative config (JSON text or an already parsed
    object). One-line :class:`ConfigError` naming the field on anything it does not model."""
    if isinstance(value, str):
        try:
            doc = json.loads(value)
        except ValueError as exc:
            raise ConfigError(f"{FLAG}: not valid JSON ({exc})") from None
    else:
        doc = value
    if not isinstance(doc, dict):
        raise ConfigError(f"{FLAG}: expected a JSON object, got {type(doc).__name__}")
    for field in doc:
        if field not in KNOWN:
            raise ConfigError(f"{FLAG}: field {field}: not modelled by simspec (it models: {', '.join(KNOWN)})")
    method = doc.get("method")
    if method is None:
        if "model" not in doc:
            raise ConfigError(f"{FLAG}: field method: missing (and no model to infer a draft model from)")
        method = "draft_model"
    if not isinstance(method, str) or method not in METHOD_MAP:
        raise ConfigError(f"{FLAG}: field method: {method!r} is not modelled (choose from "
                          f"{', '.join(sorted(METHOD_MAP))})")
    name = METHOD_MAP[method]
    if "num_speculative_tokens" not in doc and "speculative_num_steps" not in doc:
        raise ConfigError(f"{FLAG}: field num_speculative_tokens: missing")
    depth = _int("num_speculative_tokens", doc.get("num_speculative_tokens", doc.get("speculative_num_steps")), 1)
    if "speculative_num_steps" in doc:
        steps = _int("speculative_num_steps", doc["speculative_num_steps"], 1)
        if steps != depth:
            raise ConfigError(f"{FLAG}: field speculative_num_steps: {steps} disagrees with "
                              f"num_speculative_tokens {depth}")
    tree = {key: doc[key] for key in ("speculative_eagle_topk", "speculative_num_draft_tokens") if key in doc}
    if tree and name not in TREE_METHODS:
        field = next(iter(tree))
        raise ConfigError(f"{FLAG}: field {field}: method {method} drafts a chain (trees: "
                          f"{', '.join(TREE_METHODS)})")
    if name == "draft":
        return f"draft:k={depth}"
    params = [f"depth={depth}"]
    if "speculative_eagle_topk" in tree:
        params.append(f"topk={_int('speculative_eagle_topk', tree['speculative_eagle_topk'], 1)}")
    if "speculative_num_draft_tokens" in tree:
        params.append(f"tokens={_int('speculative_num_draft_tokens', tree['speculative_num_draft_tokens'], 2)}")
    return f"{name}:" + ",".join(params)
