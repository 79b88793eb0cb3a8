"""PersonalizedRewardModel: a frozen backbone + per-user adapters + the backbone's scalar head."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import files, population
from .adapters import AdapterConfig, PersonalLoRALayer, UserRouter
from .backbone import load_backbone, prepare_backbone
from .config import METHODS
from .head import PersonalHead
from .inject import head_module_names, inject_adapters, score_head
from .users import UserVocab

FORMAT_VERSION = 1
CONFIG_FILE = "sharelora.json"
USERS_FILE = "users.json"
WEIGHTS_FILE = "adapters.safetensors"
POPULATION_FILE = "population.safetensors"


HEAD_KEPT = "kept from the checkpoint: the model starts as that reward model"
HEAD_NEW = "new: the checkpoint has no score head, initialized as transformers does"


class ModelFormatError(ValueError):
    """A saved model directory that is missing, corrupt or inconsistent."""


class PersonalizedRewardModel(nn.Module):
    """``r_u(x, y)``: a transformer reward model whose target layers are adapted per user.

    Args:
        backbone: a transformers ``*ForSequenceClassification`` model with ``num_labels=1``.
        users: the user names (or a ``UserVocab``); their order fixes the table rows.
        adapter: how target layers are adapted (default: ``sharelora``, r=8, alpha=16).
        tokenizer: travels with the model and is saved with it; optional for tensor-only use.
        backbone_name: hub id or directory to reload the backbone from (``save_pretrained``
            references it rather than copying the weights).
        revision: the hub revision of ``backbone_name``.
        max_length: token budget for prompt + response.
        new_parameters: backbone parameters the checkpoint did not hold (besides the head);
            they train and are saved with the adapters.

    Only the adapters and the head (plus ``new_parameters``) have ``requires_grad``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        users: Iterable[object] | UserVocab,
        adapter: AdapterConfig | None = None,
        tokenizer=None,
        backbone_name: str | None = None,
        revision: str | None = None,
        max_length: int = 512,
        new_parameters: Iterable[str] = (),
    ):
        super().__init__()
        users = users if isinstance(users, UserVocab) else UserVocab(users)
        if len(users) == 0:
            raise ValueError("a personalized reward model needs at least one user")
        adapter = adapter or AdapterConfig()
        prepare_backbone(backbone, tokenizer)
        self.backbone = backbone
        self.users = users
        self.adapter_config = adapter
        self.tokenizer = tokenizer
        self.backbone_name = backbone_name or getattr(backbone.config, "_name_or_path", "") or None
        self.revision = revision
        self.max_length = max_length
        # Where the score head's weights came from (``from_backbone`` knows; None otherwise).
        self.head_init: str | None = None
        # The population model when training set one (sharelora.population); None: the mean.
        self.population: dict[str, torch.Tensor] | None = None
        self.router = UserRouter(len(users))
        self.adapter_layers: dict[str, PersonalLoRALayer | PersonalHead] = inject_adapters(
            backbone, adapter, len(users), self.router
        )
        if METHODS[adapter.method].head:
            name, linear = score_head(backbone)
            self.user_head = PersonalHead(linear, len(users), self.router, adapter.method)
            self.adapter_layers[name] = self.user_head
        backbone.requires_grad_(False)
        heads = head_module_names(backbone)
        self.trainable_backbone_names = sorted(
            {n for n, _ in backbone.named_parameters() if n.split(".")[0] in heads}
            | set(new_parameters)
        )
        params = dict(backbone.named_parameters())
        for name in self.trainable_backbone_names:
            # The head's scalar output bias cancels in r(y+) - r(y-): the loss cannot see it,
            # and Adam would turn its rounding-noise gradient into drift. It stays as loaded.
            is_offset = name.endswith("bias") and params[name].numel() == 1
            params[name].requires_grad_(not is_offset)
        for layer in self.adapter_layers.values():
            for p in layer.parameters(recurse=False):
                p.requires_grad_(True)

    # ----------------------------------------------------------------------------- building
    @classmethod
    def from_backbone(
        cls,
        backbone: str | os.PathLike | nn.Module,
        users: Iterable[object] | UserVocab,
        adapter: AdapterConfig | None = None,
        tokenizer=None,
        revision: str | None = None,
        trust_remote_code: bool = False,
        dtype=None,
        max_length: int = 512,
    ) -> PersonalizedRewardModel:
        """Build from a hub id, a local directory or ``.gguf`` file (``sharelora.backbone``), or
        an already-built transformers model."""
        if isinstance(backbone, (str, os.PathLike)):
            backbone = os.fspath(backbone)
            model, tok, new = load_backbone(backbone, revision, trust_remote_code, dtype)
            obj = cls(model, users, adapter, tokenizer or tok, backbone, revision, max_length, new)
            heads = head_module_names(model)
            fresh = any(name.split(".")[0] in heads for name in new)
            # A reward model's trained head is kept: the population starts as that model.
            obj.head_init = HEAD_NEW if fresh else HEAD_KEPT
            return obj
        return cls(backbone, users, adapter, tokenizer, None, revision, max_length)

    @property
    def num_users(self) -> int:
        return len(self.users)

    @torch.no_grad()
    def add_users(self, names: Iterable[object]) -> list[int]:
        """Append new users; their rows of every per-user table start at the population model
        (``sharelora.population.of``). Existing rows are not touched. Returns the ids of
        ``names`` (known names keep theirs)."""
        before = self.num_users
        start = population.of(self)
        ids = self.users.add(names)
        added = self.num_users - before
        if added:
            for lname, layer in self.adapter_layers.items():
                for name, table in layer.user_parameters.items():
                    rows = start[f"{lname}.{name}"].to(table).expand(added, *table.shape[1:])
                    grown = nn.Parameter(torch.cat([table, rows]), table.requires_grad)
                    setattr(layer, name, grown)
            self.router.num_users = self.num_users
        return ids

    # ------------------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        user_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Rewards ``[batch]`` for token ids ``[batch, T]`` and ``user_ids`` ``[batch]``.

        ``user_ids`` reach the adapter layers for this call only. Extra keyword arguments
        (``token_type_ids``, ``inputs_embeds``, ...) go to the backbone.
        """
        if getattr(self, "_is_replica", False):
            raise RuntimeError(
                "nn.DataParallel is not supported: it splits the inputs across replicas but not "
                "the per-call user routing. Use one process per device: `accelerate launch`."
            )
        if user_ids is None and self.adapter_config.personalized:
            raise ValueError(
                f"method {self.adapter_config.method!r} is personalized: pass user_ids "
                "(LongTensor [batch], from model.users.encode(names))"
            )
        if user_ids is not None:
            batch = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
            if batch is not None and len(user_ids) != batch.shape[0]:
                raise ValueError(
                    f"user_ids has {len(user_ids)} entries but the batch has {batch.shape[0]} "
                    "rows; give one user id per row"
                )
        with self.router.route(user_ids):
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return out.logits.squeeze(-1).float()

    def gradient_checkpointing_enable(self) -> None:
        """Recompute backbone activations in backward; user routing survives the recompute."""
        kwargs = {"use_reentrant": False, "context_fn": self.router.checkpoint_contexts}
        enable = getattr(self.backbone, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    # --------------------------------------------------------------------------- parameters
    def user_parameters(self) -> list[nn.Parameter]:
        """Per-user tables (first dim = user); no weight decay, optionally row-sparse."""
        return [p for layer in self.adapter_layers.values() for p in layer.user_parameters.values()]

    def keep_user_tables_on_host(self) -> None:
        """Keep every per-user table (and so its optimizer state) in host memory, pinned when
        CUDA is there: moving the model leaves them, and each forward sends only the batch's
        rows to the device. The number of users is then bounded by host RAM."""
        self.router.host_tables = True
        for table in self.user_parameters():
            data = table.data.cpu()
            table.data = data.pin_memory() if torch.cuda.is_available() else data

    def shared_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters shared by all users: shared factors and the head."""
        user = {id(p) for p in self.user_parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in user]

    def parameter_report(self, users: int | None = None) -> dict[str, int]:
        """Trainable parameter counts: shared (factors + head), per user, and in total
        (``users``: of a model this one is a shard of)."""
        users = users or self.num_users
        per_user = sum(p[0].numel() for p in self.user_parameters())
        shared = sum(p.numel() for p in self.shared_parameters())
        frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad)
        return {
            "users": users,
            "shared": shared,
            "per_user": per_user,
            "trainable": shared + per_user * users,
            "frozen": frozen,
        }

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter tensors and trained backbone parameters (the head), by name."""
        out = {}
        for name, layer in self.adapter_layers.items():
            for pname, p in layer.named_parameters(recurse=False):
                out[f"{name}.{pname}"] = p.detach()
        params = dict(self.backbone.named_parameters())
        for name in self.trainable_backbone_names:
            out[name] = params[name].detach()
        return out

    # ---------------------------------------------------------------------------- save/load
    def config_dict(self, training: dict | None = None) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "backbone": {"name_or_path": self.backbone_name, "revision": self.revision},
            "adapter": self.adapter_config.to_dict(),
            "num_users": self.num_users,
            "max_length": self.max_length,
            "trainable_backbone_parameters": self.trainable_backbone_names,
            "training": training or {},
        }

    def save_pretrained(
        self,
        directory: str | Path,
        training: dict | None = None,
        users: UserVocab | None = None,
        tables: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Write ``sharelora.json``, ``users.json``, ``adapters.safetensors`` and the tokenizer.

        The backbone is referenced by ``backbone_name``, not copied. ``users`` and ``tables``
        (each per-user table by name, ``[len(users), ...]``) stand in for the model's own: a
        user-sharded run writes every process's users as one model (``sharelora.shard``).
        """
        if not self.backbone_name:
            raise ValueError(
                "the backbone was passed as an in-memory model with no name or path, so a saved "
                "model could not find it again: save it with backbone.save_pretrained(DIR) and "
                "build with PersonalizedRewardModel.from_backbone(DIR, ...)"
            )
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous().cpu() for k, v in self.trainable_state_dict().items()}
        tensors.update(tables or {})
        users = users or self.users
        files.save_safetensors(tensors, d / WEIGHTS_FILE, metadata={"format": "pt"})
        if self.population is not None:
            rows = {k: v.contiguous().cpu() for k, v in self.population.items()}
            files.save_safetensors(rows, d / POPULATION_FILE, metadata={"format": "pt"})
        else:
            (d / POPULATION_FILE).unlink(missing_ok=True)  # a previous save's
        users.save(d / USERS_FILE)
        files.write_json(d / CONFIG_FILE, {**self.config_dict(training), "num_users": len(users)})
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(d)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        backbone: str | None = None,
        trust_remote_code: bool = False,
        dtype=None,
    ) -> PersonalizedRewardModel:
        """Load a directory written by ``save_pretrained``; ``backbone`` overrides its path."""
        d = Path(directory)
        config = read_config(d)
        try:
            users = UserVocab.load(d / USERS_FILE)
        except ValueError as err:
            raise ModelFormatError(str(err)) from err
        if len(users) != config["num_users"]:
            raise ModelFormatError(
                f"{d / USERS_FILE}: {len(users)} users but {CONFIG_FILE} says {config['num_users']}"
            )
        ref = config["backbone"]
        name = backbone or ref["name_or_path"]
        has_tokenizer = (d / "tokenizer_config.json").exists()
        model, tok, _ = load_backbone(
            name,
            ref.get("revision"),
            trust_remote_code,
            dtype,
            tokenizer_source=str(d) if has_tokenizer else None,
        )
        obj = cls(
            model,
            users,
            AdapterConfig(**config["adapter"]),
            tok,
            name,
            ref.get("revision"),
            config["max_length"],
            config["trainable_backbone_parameters"],
        )
        obj.load_trainable(d / WEIGHTS_FILE)
        obj.load_population(d)
        obj.training_summary = config.get("training", {})
        return obj

    def load_population(self, directory: str | Path) -> None:
        """Set ``population`` from ``DIR/population.safetensors``, or to ``None`` without it."""
        path = Path(directory) / POPULATION_FILE
        # Any user's row has the population's names and shapes; a mean would cost O(users).
        self.population = _read_checked(path, population.from_row(self)) if path.exists() else None

    def load_trainable(self, path: str | Path) -> None:
        """Load adapter and head tensors, checking names and shapes against this model."""
        self.set_trainable(_read_checked(Path(path), self.trainable_state_dict()))

    @torch.no_grad()
    def set_trainable(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy ``tensors`` (``trainable_state_dict``'s names) into the model, in place."""
        for name, target in self.trainable_state_dict().items():
            target.copy_(tensors[name])

    def user_index(self, user: object | None) -> int | None:
        """The table row of ``user``; ``None`` for the ``shared`` method (one row for all)."""
        if not self.adapter_config.personalized:
            return None
        if user is None:
            raise ValueError(f"method {self.adapter_config.method!r} is personalized: name a user")
        return self.users.id(user)


def _read_checked(path: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, whose names and shapes must be those of ``expected``."""
    if not path.exists():
        raise ModelFormatError(f"{path}: file not found")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelFormatError(f"{path}: not a readable safetensors file ({err})") from err
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ModelFormatError(
            f"{path}: tensors do not match the config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    for name, target in expected.items():
        if tensors[name].shape != target.shape:
            raise ModelFormatError(
                f"{path}: tensor {name} has shape {tuple(tensors[name].shape)}, expected "
                f"{tuple(target.shape)}"
            )
    return tensors


def read_config(directory: Path) -> dict:
    """Read and check ``sharelora.json`` of a saved model directory."""
    path = directory / CONFIG_FILE
    if not path.exists():
        raise ModelFormatError(f"{path}: file not found; is {directory} a sharelora model?")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFormatError(f"{path}: not valid JSON ({err})") from err
    version = config.get("format_version") if isinstance(config, dict) else None
    if version != FORMAT_VERSION:
        raise ModelFormatError(
            f"{path}: format_version {version!r} is not supported (this sharelora reads "
            f"{FORMAT_VERSION})"
        )
    for key in ("backbone", "adapter", "num_users", "max_length", "trainable_backbone_parameters"):
        if key not in config:
            raise ModelFormatError(f"{path}: missing key {key!r}")
    return config
