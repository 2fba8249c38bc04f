"""Training configuration: one dataclass per YAML section, validated in one place.

A run is described by a YAML file (configs/*.yaml) with sections model, parallel, data, optim, training;
any field can be overridden on the command line with `--set section.field=value` (value parsed as YAML).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from vq_megatron.models.config import ModelConfig

__all__ = ["ParallelConfig", "DataConfig", "OptimConfig", "TrainingConfig", "RunConfig", "load_run_config",
           "run_config_from_dict"]


@dataclass
class ParallelConfig:
    """tensor_parallel: TP size (divides attention heads); pipeline_parallel: PP size (divides num_layers;
    megatron-core's 1F1B schedule, ZeRO-1/2; see docs/PARALLELISM.md); sequence_parallel: Megatron SP, activations split along the sequence between the TP ranks
    (needs tensor_parallel > 1; any device: the local spec then uses a norm that supports it).
    Data parallel size = world size / (TP · PP)."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    sequence_parallel: bool = False

    def __post_init__(self):
        if self.tensor_parallel < 1 or self.pipeline_parallel < 1:
            raise ValueError("parallel.tensor_parallel and parallel.pipeline_parallel must be >= 1")
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise ValueError("parallel.sequence_parallel=true splits the sequence between tensor-parallel ranks: "
                             "it needs parallel.tensor_parallel > 1")


@dataclass
class DataConfig:
    """train_prefix: Megatron indexed dataset prefix (.bin/.idx) for training.
    eval_sets: name -> indexed prefix evaluated sequentially (e.g. c4_val, wikitext); a sidecar
        `<prefix>.meta.json` with "words" adds word-level perplexity.
    tokenizer_model: sentencepiece model used to build the data (recorded, used by generate/evaluate).
    eval_tokens: at most this many tokens per eval set in the final evaluation (0 = all).
    interval_eval_tokens: the same cap for the periodic evaluations during training (0 = all).
    cache_dir: where megatron's GPTDataset caches its sample index (default: next to the data)."""

    train_prefix: str = ""
    eval_sets: dict = field(default_factory=dict)
    tokenizer_model: str = ""
    eval_tokens: int = 0
    interval_eval_tokens: int = 32768
    cache_dir: str = ""

    def __post_init__(self):
        if self.eval_tokens < 0 or self.interval_eval_tokens < 0:
            raise ValueError("data.eval_tokens and data.interval_eval_tokens must be >= 0")


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to min_lr; clip_grad is the global grad-norm clip
    (0 disables)."""

    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    clip_grad: float = 1.0

    def __post_init__(self):
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"optim: need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.warmup_steps < 0 or self.clip_grad < 0 or self.weight_decay < 0:
            raise ValueError("optim.warmup_steps, clip_grad and weight_decay must be >= 0")


@dataclass
class TrainingConfig:
    """steps: optimizer steps (0: evaluate and checkpoint the initial model only, e.g. a head converted post hoc
    from a dense run with model.init_from); micro_batch_size per data-parallel rank; global_batch_size =
    micro · DP · gradient-accumulation; seed: model init, data order, dropout.
    log_interval / eval_interval / save_interval: in steps (0 disables eval/save during training).
    save_dir: checkpoints + logs (metrics.csv, tensorboard/) of this run; keep_last: checkpoints kept.
    resume: continue from the latest complete checkpoint in save_dir if there is one.
    resume_tag: resume from this checkpoint (e.g. step_00000200) instead of the latest complete one.
    verify_checkpoints: check SHA-256 checksums of a checkpoint's files before loading it.
    nan_policy: on a NaN/Inf training loss, 'stop' with an error, or 'skip' the micro-batch (zero gradient,
        counted) and stop only after max_skipped_microbatches in a row.
    deepspeed_config: DeepSpeed JSON; precision: fp32 or bf16 (bf16 is for GPUs)."""

    steps: int = 100
    micro_batch_size: int = 4
    global_batch_size: int = 8
    seed: int = 1234
    log_interval: int = 10
    eval_interval: int = 0
    save_interval: int = 0
    save_dir: str = "runs/default"
    keep_last: int = 2
    resume: bool = True
    resume_tag: str = ""
    verify_checkpoints: bool = True
    deepspeed_config: str = "configs/deepspeed/zero1_fp32.json"
    precision: str = "fp32"
    nan_policy: str = "stop"
    max_skipped_microbatches: int = 10

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"training.steps must be >= 0 (0: evaluate the initial model only), got {self.steps}")
        for name in ("micro_batch_size", "global_batch_size", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"training.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("log_interval", "eval_interval", "save_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"training.{name} must be >= 0")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"training.precision must be fp32 or bf16, got {self.precision!r}")
        if self.nan_policy not in ("stop", "skip"):
            raise ValueError(f"training.nan_policy must be 'stop' or 'skip', got {self.nan_policy!r}")


@dataclass
class RunConfig:
    model: ModelConfig
    parallel: ParallelConfig
    data: DataConfig
    optim: OptimConfig
    training: TrainingConfig

    def __post_init__(self):
        self._check_pipeline_parallel()

    def _check_pipeline_parallel(self) -> None:
        """What the pipeline driver cannot do, refused up front with what to use instead."""
        pp = self.parallel.pipeline_parallel
        if pp == 1:
            return
        where = f"parallel.pipeline_parallel={pp}"
        if self.model.num_layers % pp:
            raise ValueError(f"{where} must divide model.num_layers={self.model.num_layers} (equal stages)")
        refused = {
            "model.tie_embeddings=true": (self.model.tie_embeddings, "the first and last stage would each hold "
                                          "a copy of the embedding; set model.tie_embeddings=false"),
            "training.nan_policy=skip": (self.training.nan_policy == "skip", "the pipeline schedule backpropagates "
                                         "each micro-batch on every stage before the loss can be checked; use "
                                         "nan_policy=stop"),
            "model.vq.recluster_interval > 0": (
                self.model.output_layer == "vq" and bool(self.model.vq_config().recluster_interval),
                "re-clustering reads the input embedding (first stage) into the map (last stage); set "
                "model.vq.recluster_interval=0, or re-cluster in a pipeline_parallel=1 run"),
            "model.init_from": (bool(self.model.init_from), "two-stage loading maps a dense run's weights onto a "
                                "single-stage model; run the VQ stage with pipeline_parallel=1, or convert first"),
            "model.mtp_num_layers > 0": (bool(self.model.mtp_num_layers), "the MTP layers need the embedding on "
                                         "the last stage; train MTP with pipeline_parallel=1"),
            "model.backbone=hybrid": (self.model.backbone == "hybrid", "the pipeline driver is built and tested "
                                      "with GPTModel stages; use model.backbone=gpt"),
        }
        for what, (bad, why) in refused.items():
            if bad:
                raise ValueError(f"{what} is not supported with {where}: {why}")

    def gradient_accumulation(self, data_parallel: int) -> int:
        per_step = self.training.micro_batch_size * data_parallel
        if self.training.global_batch_size % per_step:
            raise ValueError(f"training.global_batch_size={self.training.global_batch_size} is not a "
                             f"multiple of micro_batch_size x data_parallel = {per_step}")
        return self.training.global_batch_size // per_step

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {"model": ModelConfig, "parallel": ParallelConfig, "data": DataConfig, "optim": OptimConfig,
             "training": TrainingConfig}


def _apply_override(raw: dict, assignment: str) -> None:
    if "=" not in assignment or "." not in assignment.split("=", 1)[0]:
        raise ValueError(f"override {assignment!r} must look like section.field=value")
    path, value = assignment.split("=", 1)
    keys = path.split(".")
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {assignment!r}: {key} is not a section")
    node[keys[-1]] = yaml.safe_load(value)


def _coerce(section: str, cls, values: dict) -> dict:
    """Check scalar types against the dataclass annotations (YAML reads `3e-3` as a string)."""
    kinds = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    out = dict(values)
    for name, value in values.items():
        kind, where = kinds[name], f"{section}.{name}"
        if kind == "float" and not isinstance(value, bool):
            try:
                out[name] = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{where} must be a number, got {value!r}") from None
        elif kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        elif kind == "bool" and not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        elif kind == "str" and value is None:
            out[name] = ""              # `--set data.tokenizer_model=` (empty) means "unset"
        elif kind == "str" and not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r}")
        elif kind == "dict" and not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping, got {value!r}")
    return out


def load_run_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Read YAML, apply `section.field=value` overrides, build and validate every section."""
    raw = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: top level must be a mapping of sections")
    for assignment in overrides:
        _apply_override(raw, assignment)
    return run_config_from_dict(raw)


def run_config_from_dict(raw: dict) -> RunConfig:
    """Build and validate every section from a mapping (a parsed YAML, or a run's config.json)."""
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ValueError(f"unknown config section(s) {unknown}; valid: {sorted(_SECTIONS)}")
    sections = {}
    for name, cls in _SECTIONS.items():
        values = raw.get(name) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(values) - known)
        if bad:
            raise ValueError(f"unknown option(s) {bad} in section '{name}'; valid: {sorted(known)}")
        try:
            sections[name] = cls(**_coerce(name, cls, values))
        except TypeError as err:
            raise ValueError(f"section '{name}': {err}") from err
    return RunConfig(**sections)
