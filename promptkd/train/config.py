"""The training configuration: one validated dataclass, read from YAML and ``key=value`` overrides.

Every field has a default; a YAML file names the fields it changes. Unknown keys, wrong types and
values out of range raise ``InputError`` / ``InputTypeError`` (a ``ValueError`` / ``TypeError``) naming
the key, before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields

from ..errors import InputError, InputTypeError

METHODS = ("sft", "kd", "rkl", "gkd", "distillm", "promptkd")
DTYPES = ("auto", "float32", "bfloat16")
SKEWS = ("forward", "reverse")
# Shipped configurations (promptkd/configs/*.yaml) can be named without their path.
CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")


@dataclass
class TrainConfig:
    """Everything a run needs. Effective batch = batch_size * gradient_accumulation * processes."""

    # What to train
    method: str = "promptkd"          # sft | kd | rkl | gkd | distillm | promptkd
    student: str = ""                 # local directory, .gguf file or Hugging Face hub name of a causal LM
    teacher: str = ""                 # the same, for every method but sft (and kd from a teacher_cache)
    teacher_cache: str = ""           # kd only: a directory of `promptkd cache-teacher`; the teacher is not loaded
    teacher_server: str = ""          # a served teacher's URL (promptkd.served.online): the teacher is not loaded
    teacher_server_api: str = "vllm"  # vllm | sglang
    teacher_server_model: str = ""    # the served model's name (empty: the only one the server serves)
    teacher_server_payload: str = "logprobs"  # logprobs (kd: top-k; rkl: sampled tokens) | hidden (every method)
    teacher_server_top_k: int = 20    # kd from served log-probabilities: the top k (plus the label) per position
    teacher_server_concurrency: int = 8  # requests in flight
    teacher_server_timeout: float = 120.0  # seconds per request (then retries with backoff)
    tokenizer: str = ""               # defaults to the student's directory / name
    output_dir: str = "runs/promptkd"

    # Data (JSONL; see promptkd.train.data)
    train_file: str = ""
    valid_file: str = ""              # model selection by ROUGE-L; empty: no validation
    max_length: int = 512             # prompt + response tokens
    max_prompt_length: int = 256      # longer prompts are dropped (and counted in the log)
    max_valid_examples: int = 500     # validation subset size (the first ones of the file)

    # Optimisation (AdamW, linear warmup then constant, as the reference code)
    seed: int = 10
    epochs: int = 10
    max_steps: int = 0                # > 0 overrides epochs
    batch_size: int = 8               # per process and micro-batch
    gradient_accumulation: int = 1
    lr: float = 5e-5
    weight_decay: float = 0.01
    clip_grad_norm: float = 1.0       # 0 disables clipping
    warmup_steps: int = 100
    adam_betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8

    # Methods
    kd_ratio: float = 0.5             # kd: loss = kd_ratio * KL(p||q) + (1 - kd_ratio) * CE
    gkd_beta: float = 0.5             # gkd: JSD(beta)
    gkd_lambda: float = 0.5           # gkd: probability that a batch uses student samples
    distillm_skew: str = "forward"    # distillm: skew forward or skew reverse KL
    distillm_alpha: float = 0.1
    distillm_student_ratio: float = 0.0  # distillm: probability that a batch uses student samples
    prompt_length: int = 7            # promptkd: soft prompt tokens
    prompt_init_text: str = "Suppose you are a student."
    prompt_lr: float = 0.0            # promptkd: prompt optimizer learning rate (0: same as lr)
    prompt_reg: float = 1.0           # promptkd: lambda of the KL(p_TP || p_T) regulariser, decayed linearly
    prompt_frozen: bool = False       # promptkd: keep the soft prompt at its initialisation (no prompt step)
    num_samples: int = 1              # responses sampled per instruction (on-policy methods)
    share_prefix: bool = False        # sampled batches run each instruction once, shared by its samples
    max_new_tokens: int = 0           # sampled response length (0: max_length - prompt length)
    sample_temperature: float = 1.0   # reference: temperature 1, no top-k / top-p truncation

    # Models and kernels
    dtype: str = "auto"               # auto: bfloat16 on CUDA, float32 on CPU (float16: refused, no loss scaling)
    device: str = "auto"              # auto (cuda:LOCAL_RANK if CUDA is available, else cpu), cpu, cuda, cuda:N
    gradient_checkpointing: bool = False
    fsdp: bool = False                # shard student and teacher over the torchrun processes (FSDP2)
    loss_impl: str = "auto"           # promptkd.fused_linear_kd_loss implementation
    attention_impl: str = "auto"      # promptkd.prefix_attention implementation (prompted teacher)

    # Evaluation, checkpoints, logs
    eval_interval: int = 0            # steps between validations (0: at the end of each epoch)
    eval_seeds: tuple = (10,)         # validation generation seeds
    eval_max_new_tokens: int = 64
    eval_batch_size: int = 32
    save_interval: int = 0            # steps between checkpoints (0: at the end of each epoch)
    keep_checkpoints: int = 2
    log_interval: int = 1
    tensorboard: bool = True          # when the tensorboard package is installed
    progress: bool = True             # tqdm bar on rank 0
    extra: dict = field(default_factory=dict)  # free-form notes kept with the run (not used by the trainer)

    def __post_init__(self):
        self.validate()

    # ---- validation ----

    def validate(self) -> None:
        _one_of("method", self.method, METHODS)
        if self.dtype == "float16":
            raise InputError("dtype float16 is not supported for training: promptkd trains without loss scaling, so "
                             "small float16 gradients would underflow to zero; use bfloat16 (float32's range at "
                             "float16's size) or float32")
        _one_of("dtype", self.dtype, DTYPES)
        _one_of("distillm_skew", self.distillm_skew, SKEWS)
        from ..impls import ATTENTION_IMPLS, IMPLS

        _one_of("loss_impl", self.loss_impl, IMPLS)
        _one_of("attention_impl", self.attention_impl, ATTENTION_IMPLS)
        for name in ("max_length", "max_prompt_length", "epochs", "batch_size", "gradient_accumulation",
                     "prompt_length", "num_samples", "eval_max_new_tokens", "eval_batch_size", "keep_checkpoints",
                     "log_interval", "teacher_server_top_k", "teacher_server_concurrency"):
            _int(name, getattr(self, name), minimum=1)
        for name in ("max_steps", "warmup_steps", "max_new_tokens", "eval_interval", "save_interval", "seed",
                     "max_valid_examples"):
            _int(name, getattr(self, name), minimum=0)
        if self.max_prompt_length >= self.max_length:
            raise InputError(f"max_prompt_length ({self.max_prompt_length}) must be < max_length ({self.max_length})")
        for name in ("lr", "sample_temperature", "teacher_server_timeout"):
            if _float(name, getattr(self, name)) <= 0:
                raise InputError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("weight_decay", "clip_grad_norm", "prompt_lr", "prompt_reg", "adam_eps"):
            if _float(name, getattr(self, name)) < 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("kd_ratio", "gkd_lambda", "distillm_student_ratio"):
            if not 0.0 <= _float(name, getattr(self, name)) <= 1.0:
                raise InputError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if not 0.0 < _float("gkd_beta", self.gkd_beta) < 1.0:
            raise InputError(f"gkd_beta must lie strictly between 0 and 1, got {self.gkd_beta}")
        if not 0.0 <= _float("distillm_alpha", self.distillm_alpha) < 1.0:
            raise InputError(f"distillm_alpha must satisfy 0 <= alpha < 1, got {self.distillm_alpha}")
        self.adam_betas = tuple(self.adam_betas)
        if len(self.adam_betas) != 2 or not all(0.0 <= _float("adam_betas", b) < 1.0 for b in self.adam_betas):
            raise InputError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas}")
        self.eval_seeds = tuple(self.eval_seeds) if isinstance(self.eval_seeds, (list, tuple)) else (self.eval_seeds,)
        if not self.eval_seeds:
            raise InputError("eval_seeds must name at least one seed")
        for seed in self.eval_seeds:
            _int("eval_seeds", seed, minimum=0)
        for name in ("gradient_checkpointing", "tensorboard", "progress", "share_prefix", "fsdp", "prompt_frozen"):
            if not isinstance(getattr(self, name), bool):
                raise InputTypeError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("student", "teacher", "teacher_cache", "tokenizer", "output_dir", "train_file", "valid_file",
                     "device", "prompt_init_text", "teacher_server", "teacher_server_api", "teacher_server_model",
                     "teacher_server_payload"):
            if not isinstance(getattr(self, name), str):
                raise InputTypeError(f"{name} must be a string, got {type(getattr(self, name)).__name__}")
        check_device(self.device)
        if not self.prompt_init_text.strip():
            raise InputError("prompt_init_text must not be empty (the soft prompt is initialised from its tokens)")
        if not isinstance(self.extra, dict):
            raise InputTypeError(f"extra must be a mapping, got {type(self.extra).__name__}")
        if self.prompt_frozen and self.method != "promptkd":
            raise InputError(f"prompt_frozen applies to method 'promptkd' (its soft prompt), not {self.method!r}")
        if self.num_samples > 1 and self.method not in ON_POLICY:
            raise InputError(f"num_samples > 1 applies to methods that sample ({', '.join(ON_POLICY)}), "
                             f"not {self.method!r}")
        if self.share_prefix and self.method not in ON_POLICY:
            raise InputError(f"share_prefix applies to methods that sample ({', '.join(ON_POLICY)}), "
                             f"not {self.method!r}")
        if self.teacher_cache and self.method != "kd":
            why = ("sft uses no teacher" if self.method == "sft" else
                   f"{self.method} samples responses from the student during training, and the teacher's targets "
                   "for those cannot be cached: it needs the teacher online")
            raise InputError(f"teacher_cache applies to method 'kd' only, not {self.method!r}: {why}")
        if self.teacher_server:
            self._check_server()

    def _check_server(self) -> None:
        """teacher_server: which methods and payloads a served teacher can give (promptkd.served.online)."""
        from ..served.apis import APIS
        from ..served.client import check_url
        from ..served.online import PAYLOADS

        try:
            check_url(self.teacher_server)
        except InputError as e:
            raise InputError(str(e).replace("--server", "teacher_server")) from None
        _one_of("teacher_server_api", self.teacher_server_api, APIS)
        _one_of("teacher_server_payload", self.teacher_server_payload, PAYLOADS)
        if self.teacher_cache:
            raise InputError("teacher_server and teacher_cache exclude each other: the targets come from the server at "
                             "every step, or from the cache")
        if self.method == "sft":
            raise InputError("teacher_server applies to the distillation methods; sft uses no teacher")
        if self.method == "promptkd":
            raise InputError("teacher_server cannot serve method 'promptkd': its prompt step needs the gradient of the "
                             "teacher's loss with respect to a soft prompt inside the teacher, which a server does not "
                             "give; load the teacher (teacher=PATH, teacher_server empty)")
        hidden = self.teacher_server_payload == "hidden"
        if hidden and self.teacher_server_api != "vllm":
            raise InputError(f"teacher_server_payload=hidden with teacher_server_api={self.teacher_server_api}: "
                             "promptkd reads served hidden states from vLLM's /pooling only (SGLang's hidden-state "
                             "output is not verified here); serve them with vLLM, or use teacher_server_payload="
                             "logprobs")
        if not hidden and self.method in ("gkd", "distillm"):
            raise InputError(f"teacher_server_payload=logprobs cannot give {self.method}'s divergence: it needs the "
                             "teacher's whole distribution, and a top-k slice gives forward KL (kd) or, from the "
                             "student's samples, reverse KL (rkl); serve the teacher's hidden states "
                             "(teacher_server_payload=hidden, with teacher= its weights for the output head)")
        if not hidden and self.method == "rkl" and self.sample_temperature != 1.0:
            raise InputError(f"sample_temperature={self.sample_temperature:g}: rkl from a served teacher's "
                             "log-probabilities estimates the reverse KL from the student's own samples, so they "
                             "must be drawn at temperature 1 (or serve hidden states: teacher_server_payload=hidden)")

    def check_ready(self) -> None:
        """The checks that need the fields a run must set (``validate`` accepts a partial config)."""
        missing = [name for name in ("student", "train_file") if not getattr(self, name)]
        local = not self.teacher_cache and not (self.teacher_server and self.teacher_server_payload == "logprobs")
        if self.method != "sft" and not self.teacher and local:
            missing.append("teacher")  # with served hidden states: its weights, for the output head alone
        if missing:
            raise InputError(f"method {self.method!r} needs {', '.join(missing)} to be set")

    # ---- construction ----

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> TrainConfig:
        if not isinstance(values, dict):
            raise InputError(f"{source}: expected a mapping of keys to values, got {type(values).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"{source}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
        values = dict(values)
        for f in fields(cls):
            # YAML reads 5e-5 (no dot) as a string: take numeric strings for float fields.
            if f.type == "float" and isinstance(values.get(f.name), str):
                try:
                    values[f.name] = float(values[f.name])
                except ValueError:
                    raise InputTypeError(f"{source}: {f.name} must be a number, got {values[f.name]!r}") from None
        return cls(**values)

    @classmethod
    def load(cls, path: str, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
        """Reads a YAML file (or the name of a shipped config), then applies ``key=value`` overrides
        (values parsed as YAML: ``lr=1e-5``, ``gradient_checkpointing=true``, ``eval_seeds=[10,20]``)."""
        import yaml

        path = resolve_config_path(path)
        with open(path) as f:
            try:
                values = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise InputError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(values, dict):
            raise InputError(f"{path}: expected a mapping of keys to values")
        values.update(parse_overrides(overrides))
        return cls.from_dict(values, source=path)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for name in ("adam_betas", "eval_seeds"):
            out[name] = list(out[name])
        return out

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


ON_POLICY = ("rkl", "gkd", "distillm", "promptkd")


def resolve_config_path(path: str) -> str:
    if os.path.isfile(path):
        return path
    shipped = os.path.join(CONFIG_DIR, path if path.endswith(".yaml") else path + ".yaml")
    if os.path.isfile(shipped):
        return shipped
    raise InputError(f"config: no file {path!r} (shipped configs: {', '.join(shipped_configs())})")


def shipped_configs() -> list[str]:
    if not os.path.isdir(CONFIG_DIR):
        return []
    return sorted(name[:-5] for name in os.listdir(CONFIG_DIR) if name.endswith(".yaml"))


def parse_overrides(overrides) -> dict:
    import yaml

    values = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"override {item!r} must look like key=value")
        try:
            values[key.strip()] = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            values[key.strip()] = text
    return values


def check_device(device: str) -> None:
    """'auto', 'cpu', 'cuda' or 'cuda:N' (whether that device exists is checked when a run starts)."""
    if device == "auto":
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise InputError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def _one_of(name, value, choices):
    if value not in choices:
        raise InputError(f"{name} must be one of {choices}, got {value!r}")


def _int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputTypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise InputError(f"{name} must be >= {minimum}, got {value}")
    return value


def _float(name, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputTypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise InputError(f"{name} must be finite, got {value}")
    return float(value)
