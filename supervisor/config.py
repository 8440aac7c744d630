"""The job file: one YAML document, validated strictly by pydantic.

Unknown keys are errors naming their field path, so a typo never silently falls
back to a default overnight. Durations accept seconds or ``90s``/``5m``/``2h``;
sizes accept bytes or ``20GiB``/``500MB`` (pydantic's ``ByteSize``).

This module is the one home of the defaults: ``PolicyConfig`` (what the pure
policy reads) has none of its own, and a test holds the README's table to them.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from supervisor.core.command import launcher_restarts
from supervisor.core.model import PolicyConfig
from supervisor.errors import ConfigError
from trainer_child.protocol import TrainSpec

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: object) -> object:
    """Turn ``90s``/``5m``/``2h``/``1.5`` into seconds; leave ``auto`` and bad input to pydantic."""
    if isinstance(value, str) and value.strip() != "auto":
        match = _DURATION_RE.match(value)
        if not match:
            raise ValueError(f"{value!r} is not a duration: use seconds or e.g. 90s, 5m, 2h")
        return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    return value


Duration = Annotated[float, Field(ge=0), BeforeValidator(parse_duration)]
Size = Annotated[ByteSize, Field(ge=0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RestartConfig(_Section):
    """How often and how fast to restart a failed child."""

    max_restarts: int = Field(default=20, ge=0)
    window: Duration = 3600.0
    backoff_initial: Duration = 5.0
    backoff_max: Duration = 300.0
    no_progress_limit: int = Field(default=3, ge=1)
    #: Keep a warm standby child, so a restart skips imports and the model load
    #: (auto: while host memory comfortably holds one; docs/architecture.md).
    standby: Literal["auto", "off"] = "auto"
    #: The first failure after progress restarts at once; repeated ones back off.
    first_failure: Literal["immediate", "backoff"] = "immediate"

    @model_validator(mode="after")
    def _ordered(self) -> RestartConfig:
        if self.backoff_max < self.backoff_initial:
            raise ValueError("backoff_max must be >= backoff_initial")
        return self


class RetentionConfig(_Section):
    """Which checkpoints the supervisor keeps (it owns pruning, not the Trainer)."""

    keep_last: int = Field(default=3, ge=1)
    keep_best: bool = True
    keep_every: int | None = Field(default=None, ge=1)


class DiskConfig(_Section):
    """Free space to keep: bytes, a size string, or auto (2 x the largest checkpoint)."""

    reserve: Size | Literal["auto"] = "auto"


class HangConfig(_Section):
    """How long a silent heartbeat may last, per phase, before the child is called hung."""

    timeout: Duration | Literal["auto"] = "auto"
    startup_timeout: Duration = 1800.0
    save_timeout: Duration | Literal["auto"] = "auto"
    kill_grace: Duration = 30.0


class PreemptionConfig(_Section):
    """How long an emergency checkpoint may take after SIGTERM, and the cloud's early warning."""

    grace: Duration = 120.0
    #: Poll the cloud's preemption notice and start the emergency save when it
    #: comes, before the SIGTERM (on AWS often instead of one): ``aws`` (spot
    #: ``instance-action``), ``gcp`` (``instance/preempted``), or ``off``.
    notice: Literal["off", "aws", "gcp"] = "off"
    #: The metadata service's base URL; None: the cloud's own.
    notice_url: str | None = None
    notice_interval: Duration = Field(default=5.0, gt=0)


#: fsspec protocols that cannot hold a durable, writable copy of a run.
_NOT_A_MIRROR = frozenset(
    {"memory", "http", "https", "zip", "tar", "github", "git", "data", "reference", "libarchive"}
)


class MirrorConfig(_Section):
    """A durable remote copy of every committed checkpoint (see docs/mirror.md).

    ``storage_options`` go to the fsspec backend unchanged; credentials are best
    left to the environment or the instance role. Whatever is here is never
    logged (secret-looking values are redacted) and never written under .warden/.
    """

    url: str
    storage_options: dict[str, Any] = Field(default_factory=dict)
    #: Remote checkpoints to keep; None follows ``retention.keep_last``.
    keep_last: int | None = Field(default=None, ge=1)
    #: File transfers in flight at once.
    upload_concurrency: int = Field(default=2, ge=1, le=64)

    @field_validator("url")
    @classmethod
    def _fsspec_url(cls, url: str) -> str:
        scheme, sep, rest = url.partition("://")
        if not sep or not scheme or not rest.strip("/"):
            raise ValueError(
                f"{url!r} is not a URL: use e.g. s3://bucket/prefix, gs://bucket/prefix "
                "or file:///mnt/nfs/runs/name"
            )
        # Imported here: fsspec's registry is only needed when a mirror is configured.
        from fsspec.registry import known_implementations, registry  # noqa: PLC0415

        protocol = scheme.lower()
        if protocol in _NOT_A_MIRROR:
            raise ValueError(f"{protocol}:// cannot hold a durable, writable mirror")
        if protocol not in known_implementations and protocol not in registry:
            raise ValueError(f"unknown scheme {protocol!r} in {url!r}: use s3://, gs:// or file://")
        return url


class BatchConfig(_Section):
    """The micro-batch of a ``command:`` job, so an OOM can be remediated.

    The built-in job reads it from ``train.sft`` instead.
    """

    per_device_train_batch_size: int | None = Field(default=None, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)


class MetricsConfig(_Section):
    """Prometheus metrics: served on ``address:port`` at /metrics, and/or a textfile.

    ``textfile`` is for node_exporter's textfile collector (its name must end in
    ``.prom`` there); it is replaced atomically at every update.
    """

    port: int | None = Field(default=None, ge=0, le=65535)
    address: str = "127.0.0.1"
    textfile: Path | None = None

    @model_validator(mode="after")
    def _some_sink(self) -> MetricsConfig:
        if self.port is None and self.textfile is None:
            raise ValueError("give `port` (HTTP /metrics), `textfile` (node_exporter), or both")
        return self


#: Journal events a ``notify:`` section may ask to be told about.
NotifyOn = Literal["gave_up", "completed", "failure"]


def _every_notifiable_event() -> list[NotifyOn]:
    return ["gave_up", "completed", "failure"]


class NotifyConfig(_Section):
    """Notifications through apprise URLs (chat, mail, webhooks) on chosen events.

    URLs carry tokens: they are never logged in full.
    """

    urls: list[str] = Field(min_length=1)
    on: list[NotifyOn] = Field(default_factory=_every_notifiable_event)


class Config(_Section):
    """A whole job file."""

    output_dir: Path
    train: TrainSpec | None = None
    command: list[str] | None = Field(default=None, min_length=1)
    #: ``command:`` jobs: add WardenCallback to every transformers Trainer the
    #: command builds, without editing the script (see trainer_child/inject.py).
    inject_callback: bool = True
    env: dict[str, str] = Field(default_factory=dict)
    batch: BatchConfig = BatchConfig()
    restart: RestartConfig = RestartConfig()
    retention: RetentionConfig = RetentionConfig()
    disk: DiskConfig = DiskConfig()
    hang: HangConfig = HangConfig()
    preemption: PreemptionConfig = PreemptionConfig()
    metrics: MetricsConfig | None = None
    notify: NotifyConfig | None = None
    mirror: MirrorConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _save_total_limit_is_retention(cls, data: Any) -> Any:
        """Map a user's ``train.sft.save_total_limit`` onto ``retention.keep_last``.

        The child always runs with save_total_limit=None because HF's own rotation
        can delete the only good checkpoint; the supervisor prunes instead.
        """
        if not isinstance(data, dict):
            return data
        train = data.get("train")
        sft = train.get("sft") if isinstance(train, dict) else None
        if isinstance(sft, dict) and sft.get("save_total_limit") is not None:
            retention = dict(data.get("retention") or {})
            retention.setdefault("keep_last", sft["save_total_limit"])
            data = {**data, "retention": retention}
        return data

    @model_validator(mode="after")
    def _one_job(self) -> Config:
        if (self.train is None) == (self.command is None):
            raise ValueError("give exactly one of `train:` (the built-in job) or `command:`")
        restarts = launcher_restarts(self.command or ())
        if restarts is not None and restarts.strip() != "0":
            raise ValueError(
                f"command: --max-restarts {restarts}: the launcher must not restart its "
                "workers itself (trainwarden restarts the whole group from the newest valid "
                "checkpoint); use --max-restarts 0 or leave the flag out"
            )
        return self

    @property
    def mirror_keep_last(self) -> int | None:
        """Remote checkpoints to keep: ``mirror.keep_last``, else ``retention.keep_last``."""
        if self.mirror is None:
            return None
        return self.mirror.keep_last or self.retention.keep_last

    @property
    def micro_batch(self) -> int | None:
        if self.train is not None:
            value = self.train.sft.get("per_device_train_batch_size", 8)
            return int(value) if isinstance(value, int) else None
        return self.batch.per_device_train_batch_size

    @property
    def grad_accum(self) -> int:
        if self.train is not None:
            value = self.train.sft.get("gradient_accumulation_steps", 1)
            return int(value) if isinstance(value, int) else 1
        return self.batch.gradient_accumulation_steps

    def job_digest(self) -> str:
        """Return a short digest of what the child runs: its command (or train:) and env."""
        # How many ranks run the built-in job changes how it runs, not what it
        # computes: a run completed on 2 ranks is complete on 1.
        train = None
        if self.train is not None:
            train = self.train.model_dump(mode="json", exclude={"nproc_per_node"})
        job = {"command": self.command, "train": train, "env": self.env}
        blob = json.dumps(job, sort_keys=True, default=_jsonable).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def policy(self) -> PolicyConfig:
        """The subset the pure policy reads, in seconds and bytes."""
        return PolicyConfig(
            max_restarts=self.restart.max_restarts,
            window=self.restart.window,
            backoff_initial=self.restart.backoff_initial,
            backoff_max=self.restart.backoff_max,
            first_failure_at_once=self.restart.first_failure == "immediate",
            no_progress_limit=self.restart.no_progress_limit,
            keep_last=self.retention.keep_last,
            keep_best=self.retention.keep_best,
            keep_every=self.retention.keep_every,
            disk_reserve=None if self.disk.reserve == "auto" else int(self.disk.reserve),
            hang_timeout=None if self.hang.timeout == "auto" else float(self.hang.timeout),
            startup_timeout=self.hang.startup_timeout,
            save_timeout=None
            if self.hang.save_timeout == "auto"
            else float(self.hang.save_timeout),
            kill_grace=self.hang.kill_grace,
            preemption_grace=self.preemption.grace,
            micro_batch=self.micro_batch or 0,
            grad_accum=self.grad_accum,
            require_record=self.train is not None,
            success_needs_final=self.train is not None,
            step_guard=self.train is not None or self.inject_callback,
        )


def _jsonable(value: object) -> object:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise TypeError(f"cannot digest {type(value).__name__}")


def _field_path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif parts:
            parts.append(f".{item}")
        else:
            parts.append(str(item))
    return "".join(parts) or "(top level)"


def _describe(errors: list[Any]) -> list[str]:
    lines = []
    for err in errors:
        # pydantic appends the union member / validator name to loc; drop those.
        loc = tuple(
            part
            for part in err["loc"]
            if not (isinstance(part, str) and ("[" in part or part in ("literal['auto']",)))
        )
        if err["type"] == "extra_forbidden":
            lines.append(f"{_field_path(loc)}: unknown key (check the spelling)")
        else:
            lines.append(f"{_field_path(loc)}: {err['msg']}")
    return sorted(set(lines), key=lines.index)


def parse_config(data: object, *, source: str = "<config>", base_dir: Path | None = None) -> Config:
    """Validate an already-parsed document; relative output_dir is taken from base_dir."""
    if not isinstance(data, dict):
        raise ConfigError(source, ["the file must be a YAML mapping with at least output_dir"])
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, _describe(exc.errors())) from None
    if base_dir is not None and not config.output_dir.is_absolute():
        config = config.model_copy(update={"output_dir": (base_dir / config.output_dir)})
    return config


def load_config(path: str | Path) -> Config:
    """Read and validate a job file; raise ConfigError listing every problem."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(source, [f"cannot read the file: {exc.strerror or exc}"]) from None
    # Relative output_dir is relative to the working directory, as users expect
    # from every other CLI; systemd units set WorkingDirectory for this.
    return config_from_yaml(text, source=source)


def config_from_yaml(text: str, *, source: str = "<config>") -> Config:
    """Parse and validate a job file's text; raise ConfigError naming the line of bad YAML."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [f"invalid YAML{where}: {problem}"]) from None
    return parse_config(data, source=source)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the job file (``trainwarden schema``)."""
    return Config.model_json_schema()
