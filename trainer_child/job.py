"""Build the built-in SFT + LoRA job (model, tokenizer, dataset, SFTTrainer) from a JobFile.

Everything the user can get wrong is checked here and raised as ConfigError or
DataError, so it ends as exit 78 and the supervisor does not retry a job that
can never work. The fields trainwarden owns are forced here too:

* ``output_dir`` and ``resume_from_checkpoint``: the supervisor decides them; a
  user value would fight it, so it is a config error;
* ``save_total_limit``: always None, because HF's rotation deletes checkpoints
  without knowing which one is valid; the supervisor maps the user's value to
  ``retention.keep_last`` and prunes itself;
* ``report_to``: always "none"; a restarting child must not open new tracker runs.

Heavy libraries are imported inside functions so that importing this module
costs nothing until the job is really built.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer_child import builtin
from trainer_child.errors import ConfigError, DataError
from trainer_child.heartbeat import mark
from trainer_child.protocol import JobFile, Layout, LoraSpec, TrainSpec, fsync_dir
from trainer_child.ranks import launched_rank

if TYPE_CHECKING:
    from trainer_child.callback import WardenCallback

__all__ = [
    "Preloaded",
    "build_lora_config",
    "build_sft_config",
    "build_trainer",
    "load_model_and_tokenizer",
    "load_train_dataset",
    "preload",
    "resolve_model_path",
    "save_final",
]

log = logging.getLogger("trainer_child")

#: Fields of SFTConfig that belong to trainwarden, not to the user.
RESERVED_FIELDS = ("output_dir", "resume_from_checkpoint")
#: Local file suffixes and the ``datasets`` builder that reads each.
DATASET_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _sft_field_names() -> list[str]:
    from trl.trainer.sft_config import SFTConfig

    return sorted(field.name for field in dataclasses.fields(SFTConfig) if field.init)


def _unknown_field_message(unknown: list[str], valid: list[str]) -> str:
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        parts.append(f"{name!r}{hint}")
    return f"unknown train.sft field {', '.join(parts)}: not a trl.SFTConfig field"


def _hardware_defaults(user: dict[str, Any]) -> dict[str, Any]:
    """Return precision and pinning the hardware can do, for what the user left unset.

    TRL defaults to bf16=True, which fails or crawls on a CPU; pinned memory
    only helps (and only stays quiet) with an accelerator. Several ranks on a
    machine without CUDA need ``use_cpu``: without it accelerate sees no
    distributed setup, and every rank trains alone on the whole dataset
    (measured: parallel_mode NOT_PARALLEL, world_size 1 on every rank).
    """
    import torch

    defaults: dict[str, Any] = {"dataloader_pin_memory": torch.cuda.is_available()}
    _, world_size = launched_rank()
    if world_size > 1 and not torch.cuda.is_available():
        defaults["use_cpu"] = True
    if "bf16" not in user and "fp16" not in user:
        if not torch.cuda.is_available():
            defaults.update(bf16=False, fp16=False)
        elif torch.cuda.is_bf16_supported():
            defaults.update(bf16=True, fp16=False)
        else:
            defaults.update(bf16=False, fp16=True)
    return {key: value for key, value in defaults.items() if key not in user}


def build_sft_config(job: JobFile) -> tuple[Any, dict[str, Any]]:
    """Return ``(SFTConfig, model_init_kwargs)`` for the job, validated against SFTConfig.

    ``model_init_kwargs`` is taken out of the config because the model is loaded
    here, through ``from_pretrained``, not by SFTTrainer from a name.
    """
    from trl.trainer.sft_config import SFTConfig

    user = dict(job.train.sft)
    valid = _sft_field_names()
    unknown = sorted(set(user) - set(valid))
    if unknown:
        raise ConfigError(_unknown_field_message(unknown, valid))
    for name in RESERVED_FIELDS:
        if name in user:
            raise ConfigError(
                f"train.sft.{name} is set by trainwarden (output_dir is the top-level "
                "output_dir; the checkpoint to resume from is chosen by the supervisor): remove it"
            )
    if "save_total_limit" in user:
        log.warning(
            "sft_field_ignored field=save_total_limit value=%s "
            "reason=the supervisor prunes checkpoints (retention.keep_last)",
            user.pop("save_total_limit"),
        )
    if user.get("report_to") not in (None, "none", [], ["none"]):
        log.warning("sft_field_ignored field=report_to value=%s", user["report_to"])
    user.pop("report_to", None)
    text_field = user.pop("dataset_text_field", job.train.text_field)
    if text_field != job.train.text_field:
        raise ConfigError(
            f"train.sft.dataset_text_field={text_field!r} contradicts "
            f"train.text_field={job.train.text_field!r}: set train.text_field only"
        )
    model_init_kwargs = user.pop("model_init_kwargs", None) or {}
    if not isinstance(model_init_kwargs, dict):
        raise ConfigError("train.sft.model_init_kwargs must be a mapping")

    settings: dict[str, Any] = {
        # Progress bars fill a size-bounded log with carriage returns; HF's
        # PrinterCallback prints the same metrics as plain lines instead.
        "disable_tqdm": True,
        **_hardware_defaults(user),
        **user,
        "output_dir": job.output_dir,
        "save_total_limit": None,
        "report_to": "none",
        "dataset_text_field": job.train.text_field,
    }
    overrides = job.overrides
    if overrides.per_device_train_batch_size is not None:
        settings["per_device_train_batch_size"] = overrides.per_device_train_batch_size
    if overrides.gradient_accumulation_steps is not None:
        settings["gradient_accumulation_steps"] = overrides.gradient_accumulation_steps
    try:
        config = SFTConfig(**settings)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"invalid train.sft settings: {exc}") from exc
    return config, model_init_kwargs


def resolve_model_path(spec: str) -> str:
    """Return a local folder or hub id for ``train.model`` (building a built-in model)."""
    if spec.startswith("builtin:"):
        if spec == builtin.TINY_GPT2:
            return str(builtin.ensure_tiny_gpt2())
        raise ConfigError(
            f"unknown built-in model {spec!r}: use {', '.join(builtin.BUILTIN_MODELS)}"
        )
    path = os.path.expanduser(spec)
    if os.path.exists(path):
        return path
    if spec.startswith(("/", ".", "~")):
        raise ConfigError(f"train.model {spec!r} is not an existing folder")
    return spec


def _is_missing_repo(exc: BaseException) -> bool:
    # huggingface_hub's RepositoryNotFoundError and friends: the id is wrong, not the network.
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"RepositoryNotFoundError", "RevisionNotFoundError", "GatedRepoError"})


def load_model_and_tokenizer(
    spec: str, model_init_kwargs: dict[str, Any], *, trust_remote_code: bool = False
) -> tuple[Any, Any]:
    """Load the causal LM and its tokenizer through ``from_pretrained``, as for any model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(spec)
    kwargs = {"trust_remote_code": trust_remote_code, **model_init_kwargs}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as exc:
        if _is_missing_repo(exc):
            raise ConfigError(f"train.model {spec!r} does not exist: {exc}") from exc
        raise
    return model, tokenizer


def load_train_dataset(train: TrainSpec) -> Any:
    """Load ``train.dataset`` and keep only ``train.text_field``; DataError if unusable."""
    import datasets
    from datasets.exceptions import DataFilesNotFoundError, DatasetNotFoundError

    spec = train.dataset
    if spec.startswith("builtin:"):
        if spec != builtin.TINY_DATASET:
            choices = ", ".join(builtin.BUILTIN_DATASETS)
            raise ConfigError(f"unknown built-in dataset {spec!r}: use {choices}")
        dataset = builtin.tiny_dataset()
    else:
        path = Path(os.path.expanduser(spec))
        suffix = path.suffix.lower()
        if suffix in DATASET_BUILDERS or spec.startswith(("/", ".", "~")):
            if not path.is_file():
                raise DataError(f"train.dataset file {spec!r} does not exist")
            if suffix not in DATASET_BUILDERS:
                supported = ", ".join(DATASET_BUILDERS)
                raise DataError(f"train.dataset {spec!r}: unsupported file type (use {supported})")
            try:
                dataset = datasets.load_dataset(
                    DATASET_BUILDERS[suffix], data_files=str(path), split="train"
                )
            except Exception as exc:
                # Anything the reader trips on is the file's fault; a full disk
                # under the datasets cache is still seen as disk_full (errors.py).
                raise DataError(f"cannot read train.dataset {spec!r}: {exc}") from exc
        else:
            try:
                dataset = datasets.load_dataset(spec, split=train.dataset_split)
            except (DatasetNotFoundError, DataFilesNotFoundError) as exc:
                # The id or split is wrong; a network failure stays a (retried) crash.
                raise DataError(f"train.dataset {spec!r} not found: {exc}") from exc
    columns = list(dataset.column_names)
    if train.text_field not in columns:
        raise DataError(
            f"train.text_field {train.text_field!r} is not a column of {spec!r} "
            f"(columns: {', '.join(columns) or 'none'})"
        )
    dataset = dataset.select_columns([train.text_field])
    if len(dataset) == 0:
        raise DataError(f"train.dataset {spec!r} has no rows")
    return dataset


def build_lora_config(spec: LoraSpec, model: Any) -> Any:
    """Map ``train.lora`` onto ``peft.LoraConfig`` with a target default that fits the model."""
    from peft import LoraConfig
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    from transformers.pytorch_utils import Conv1D

    target = spec.target_modules
    if (
        target is None
        and model.config.model_type not in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    ):
        # PEFT knows the attention projections of common architectures; for the
        # rest, adapting every linear layer is the documented safe choice.
        target = "all-linear"
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=target,
        task_type="CAUSAL_LM",
        # GPT-2 style Conv1D stores weights transposed; PEFT would fix this with a warning.
        fan_in_fan_out=any(isinstance(module, Conv1D) for module in model.modules()),
    )


#: ``model_init_kwargs`` that put the model on an accelerator as it loads (or need
#: one to load at all): a standby must not touch CUDA before its attempt begins.
DEVICE_KWARGS = ("device_map", "quantization_config", "tp_plan", "device_mesh")


@dataclasses.dataclass
class Preloaded:
    """What a warm standby loaded before its attempt (``trainer_child/standby.py``).

    Each part is handed out once, and only to an attempt that asks for exactly
    what it was loaded from: the same model spec, ``model_init_kwargs`` and
    ``trust_remote_code``, the same dataset spec and text field. Anything else
    is loaded afresh, as in a cold start, so a mismatch costs time, never
    correctness.
    """

    train: TrainSpec
    model_settings: str
    dataset: Any = None
    model: Any = None
    tokenizer: Any = None

    def take_dataset(self, train: TrainSpec) -> Any:
        """Return the preloaded dataset if ``train`` names the same one (once)."""
        same = (train.dataset, train.dataset_split, train.text_field) == (
            self.train.dataset,
            self.train.dataset_split,
            self.train.text_field,
        )
        dataset, self.dataset = self.dataset, None
        return dataset if same else None

    def take_model(self, train: TrainSpec, settings: str) -> tuple[Any, Any] | None:
        """Return (model, tokenizer) if loaded from the same spec and settings (once)."""
        model, tokenizer = self.model, self.tokenizer
        self.model = self.tokenizer = None
        if model is None or train.model != self.train.model or settings != self.model_settings:
            return None
        return model, tokenizer


def _model_settings(init_kwargs: dict[str, Any], trust_remote_code: bool) -> str:
    return json.dumps([init_kwargs, trust_remote_code], sort_keys=True, default=repr)


def _fault_in(model: Any) -> None:
    """Read every weight once, so the pages are in memory when the attempt begins.

    ``from_pretrained`` maps safetensors files lazily: untouched, a standby's
    model would still be on disk and the attempt would read it, page by page,
    on its first forward pass. Reading is enough; no copy is made, so the pages
    stay shared with the page cache (and with a child that maps the same file).
    """
    import torch

    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.device.type == "cpu" and tensor.numel():
                tensor.sum()


def preload(job: JobFile) -> tuple[Preloaded, str]:
    """Load what the job's attempts share (dataset, base model, tokenizer); say what was.

    Runs in a standby before any attempt exists, so it never raises for the
    job's own mistakes: whatever fails here is left to the attempt, which
    reports it with the exit status the contract gives it. Nothing here may
    initialise CUDA: the SFTConfig (whose defaults ask torch about the GPU) is
    built on go, and a model placed on a device as it loads is not preloaded.
    """
    sft = dict(job.train.sft)
    init_kwargs = sft.get("model_init_kwargs") or {}
    trust = bool(sft.get("trust_remote_code", False))
    settings = _model_settings(init_kwargs if isinstance(init_kwargs, dict) else {}, trust)
    loaded = Preloaded(train=job.train, model_settings=settings)
    held = []
    try:
        loaded.dataset = load_train_dataset(job.train)
        held.append("dataset")
    except Exception as exc:
        log.warning("standby_preload_skipped part=dataset error=%r", exc)
    if not isinstance(init_kwargs, dict) or any(k in init_kwargs for k in DEVICE_KWARGS):
        return loaded, ", ".join(held) or "imports only"
    try:
        loaded.model, loaded.tokenizer = load_model_and_tokenizer(
            job.train.model, init_kwargs, trust_remote_code=trust
        )
        _fault_in(loaded.model)
        held += ["model", "tokenizer"]
    except Exception as exc:
        log.warning("standby_preload_skipped part=model error=%r", exc)
    return loaded, ", ".join(held) or "imports only"


def build_trainer(
    job: JobFile, callbacks: Sequence[Any], preloaded: Preloaded | None = None
) -> Any:
    """Return a ready SFTTrainer for ``job``: config first, then data, then the model.

    The cheap checks come first so a typo fails before a multi-GB model load.
    ``preloaded`` (a warm standby's) stands in for the loads it matches.
    """
    from trl.trainer.sft_trainer import SFTTrainer

    mark("imports")
    if job.train.model.startswith("builtin:"):
        # Built before the SFT config exists: that starts the process group, after
        # which save_pretrained writes nothing on ranks other than 0, and such a
        # rank's half-built model folder could win the rename into the cache.
        resolve_model_path(job.train.model)
    config, model_init_kwargs = build_sft_config(job)
    dataset = preloaded.take_dataset(job.train) if preloaded is not None else None
    if dataset is None:
        dataset = load_train_dataset(job.train)
    mark("dataset")
    settings = _model_settings(model_init_kwargs, config.trust_remote_code)
    warm = preloaded.take_model(job.train, settings) if preloaded is not None else None
    model, tokenizer = warm or load_model_and_tokenizer(
        job.train.model, model_init_kwargs, trust_remote_code=config.trust_remote_code
    )
    mark("model")
    lora = build_lora_config(job.train.lora, model)
    try:
        trainer = SFTTrainer(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=list(callbacks),
        )
    except (ValueError, TypeError) as exc:
        # SFTTrainer validates the config against the model and data here
        # (unknown target_modules, bad packing settings...): deterministic, so
        # a restart cannot help.
        raise ConfigError(f"the SFT trainer rejected the job: {exc}") from exc
    mark("trainer")
    return trainer


def save_final(trainer: Any, layout: Layout, warden: WardenCallback) -> Path:
    """Write ``final/`` (adapter + tokenizer + warden.json) so it appears complete or not at all.

    Everything goes into a staging folder that is committed like a checkpoint and
    then renamed to ``final``; a stale ``final/`` from an earlier run goes through
    ``.warden/trash`` first, so nothing that looks finished is ever half-written.
    """
    from trainer_child.callback import commit_checkpoint

    staging = layout.output_dir / ".final.staging"
    zero = trainer.is_world_process_zero()
    if zero:
        # Rank 0 alone: another rank's cleanup could land while rank 0 writes.
        shutil.rmtree(staging, ignore_errors=True)
    started = time.monotonic()
    trainer.save_model(str(staging))
    if not zero:
        return layout.final
    args = trainer.args
    commit_checkpoint(
        staging,
        step=trainer.state.global_step,
        reason="final",
        max_steps=trainer.state.max_steps or None,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        attempt=warden.attempt,
        save_started=started,
        world_size=warden.ranks.world_size,
    )
    if layout.final.exists():
        layout.trash.mkdir(parents=True, exist_ok=True)
        stale = layout.trash / f"final-{time.time_ns()}"
        layout.final.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)
    staging.rename(layout.final)
    fsync_dir(layout.output_dir)
    return layout.final
