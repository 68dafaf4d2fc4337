"""Typed run configuration: dataclasses with help text, TOML files and ``key=value`` overrides.

A config file is TOML whose tables mirror the dataclasses (``[clients]``, ``[ranks]``, ...).
Overrides are ``dotted.key=VALUE`` where VALUE is a TOML literal (``ranks.values=[5,20]``);
a bare word that is not valid TOML is taken as a string (``method=replication``).
"""

from __future__ import annotations

import difflib
import tomllib
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import tomli_w


NODES = "nodes"  # data.dataset: every Flower SuperNode trains on its own file (its node config's `data`)


class ConfigError(ValueError):
    """A configuration problem, stated in one line that says how to fix it."""


def _opt(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ClientsConfig:
    count: int = _opt(20, "number of registered clients (data partitions)", min=1)
    per_round: int = _opt(4, "clients sampled per round (seeded)", min=1)
    val_fraction: float = _opt(0.1, "fraction of each client's shard held out as its local validation split", min=0.0, max=0.9)


@dataclass
class RanksConfig:
    policy: str = _opt("fixed", "rank allocation: fixed | random | quality | budget")
    values: list[int] = _opt([4, 16], "ranks: one for all, one per client, or tiers (equal shares unless `fractions`)",
                             min=1)
    fractions: list[float] = _opt([], "share of clients in each tier of `values` (fixed/random); sums to 1")
    top_fraction: float = _opt(0.1, "quality policy: share of clients raised to the high rank after round 1", min=0.0, max=1.0)
    quality_by: str = _opt("validation", "quality policy: what ranks the clients after round 1: validation (each "
                           "client's local validation score of the global model, Byun & Lee) | size (training "
                           "examples: the data-rich clients get the high rank)", choices=("validation", "size"))
    budget: float = _opt(0.0, "budget policy: total uplink parameters per round over all sampled clients", min=0.0)
    distribution: str = _opt("uniform", "random policy without fractions: uniform | heavy_tail over `values`")


@dataclass
class DataConfig:
    dataset: str = _opt("bbc", "bbc (packaged BBC News), a .jsonl/.csv file, a Hugging Face dataset name/path, or "
                        "nodes (Flower deployment: every SuperNode trains on its own file, `--node-config "
                        "\"data='PATH'\"`; the server reads no training data)")
    text_field: str = _opt("text", "field holding the input text (JSONL/CSV/HF)")
    label_field: str = _opt("label", "field holding the class label (JSONL/CSV/HF)")
    partition: str = _opt("dirichlet", "iid | dirichlet | quality (Byun & Lee quality-skewed)")
    alpha: float = _opt(1.0, "Dirichlet concentration (smaller = more label skew)", min=1e-6)
    high_quality_fraction: float = _opt(0.1, "quality partition: share of clients with balanced, larger shards", min=0.0, max=1.0)
    test_fraction: float = _opt(0.2, "share of articles (or examples) held out as the test split", min=0.01, max=0.9)
    max_train_examples: int = _opt(0, "subsample the training split to this many examples (0 = all)", min=0)
    labels: list[str] = _opt([], "dataset = nodes: the label names, in label order (required); a node whose file "
                             "has a label not in this list is refused")
    test_path: str = _opt("", "dataset = nodes: the server's own test file (.jsonl/.csv/save_to_disk folder with "
                          "text_field and label_field) that evaluates the global model; \"\" = the nodes' "
                          "validation splits, their metrics weighted by their size")
    test_split: str = _opt("test", "Hugging Face datasets: name of the test split (falls back to a random split)")
    prompt_template: str = _opt("Text: {text}\nLabel:", "generate-label: the prompt; `{text}` is replaced by the "
                                "example's text and the answer is ` <label word>`")
    label_words: list[str] = _opt([], "generate-label: the answer word of each label in label order (default: the "
                                  "label names)")
    prompt_field: str = _opt("prompt", "instruct: JSONL field holding the user prompt")
    response_field: str = _opt("response", "instruct: JSONL field holding the reference response")


@dataclass
class ModelConfig:
    name: str = _opt("minilm", "minilm (packaged MiniLM-L6), smollm2 (packaged SmolLM2-135M-Instruct, dequantised "
                     "4-bit, cached under $FEDRANK_CACHE or ~/.cache/fedrank), or a local folder / hub id")
    target_modules: list[str] = _opt([], "module names that get LoRA adapters ([] = the task's default: query, value "
                                     "for classify; q_proj, v_proj for causal LM tasks)")
    head_modules: list[str] = _opt([], "modules trained in full and FedAvg-ed by every method ([] = the task's "
                                   "default: classifier for classify; none for causal LM tasks)")
    scale: float = _opt(2.0, "LoRA scaling s shared by all clients: ΔW = s·B·A", min=0.0)
    scaling: str = _opt("shared", "shared (alpha = s·r) | alpha_over_r (alpha = s·R_max) | rslora (alpha = s·√r)",
                        choices=("shared", "alpha_over_r", "rslora"))
    dropout: float = _opt(0.0, "LoRA dropout", min=0.0, max=1.0)


@dataclass
class TrainConfig:
    local_steps: int = _opt(9, "optimizer steps per client per round (ignored when local_epochs > 0)", min=1)
    local_epochs: float = _opt(0.0, "local epochs over the client's shard instead of local_steps (0 = use steps)", min=0.0)
    batch_size: int = _opt(16, "local batch size", min=1)
    max_length: int = _opt(64, "maximum tokens per example (batches are padded dynamically)", min=8)
    lr: float = _opt(2e-3, "peak learning rate (AdamW)", min=0.0)
    head_lr: float = _opt(5e-3, "learning rate of the classifier head (0 = same as lr)", min=0.0)
    weight_decay: float = _opt(0.0, "AdamW weight decay", min=0.0)
    lr_schedule: str = _opt("constant", "constant | cosine | linear, over the local steps, with warmup",
                            choices=("constant", "cosine", "linear"))
    warmup_steps: int = _opt(0, "linear warmup steps at the start of each local run", min=0)
    grad_clip: float = _opt(1.0, "gradient norm clip (0 = off)", min=0.0)
    gradient_checkpointing: bool = _opt(False, "recompute activations in the backward pass instead of storing them "
                                        "(less memory, more compute; transformers' non-reentrant checkpointing)")


@dataclass
class EvalConfig:
    max_examples: int = _opt(200, "test examples evaluated after each round (seeded subset; 0 = all)", min=0)
    every: int = _opt(1, "evaluate the global model every N rounds; the last round always (N >= rounds: only the "
                         "last)", min=1)
    final_full: bool = _opt(True, "evaluate the final global model on the whole test split")
    batch_size: int = _opt(64, "evaluation batch size", min=1)
    tiers: bool = _opt(True, "also evaluate the global model truncated to each rank tier (padding methods)")
    dynamics: bool = _opt(False, "rank-ordered methods with several tiers: record per round the norm of each tier's "
                          "part of s·Σ_j B_j A_j (`tier_norm_r<t>`) and the cosine between successive updates of the "
                          "slots above the lowest tier (`high_update_cos`)")


@dataclass
class ServerConfig:
    max_update_norm: float = _opt(0.0, "bound on the L2 norm of each uploaded update (0 = off)", min=0.0)
    norm_action: str = _opt("clip", "what happens above the bound: clip (scale down) | reject",
                            choices=("clip", "reject"))
    head: str = _opt("fedavg", "task head: fedavg (one head, averaged over all clients) | tier (one head per rank "
                     "tier, averaged over that tier's clients, all clients when the tier is absent) | frozen (kept at "
                     "its seeded init, never sent or trained: FedBABU)", choices=("fedavg", "tier", "frozen"))


@dataclass
class CommConfig:
    dtype: str = _opt("fp32", "dtype of the tensors sent each way (payloads and uploads): fp32 | bf16 | fp16; the "
                      "server casts replies back and aggregates in fp32", choices=("fp32", "bf16", "fp16"))


@dataclass
class FaultsConfig:
    drop_fraction: float = _opt(0.0, "local runtime: chance a sampled client never replies (seeded)", min=0.0, max=1.0)
    fail_fraction: float = _opt(0.0, "local runtime: chance a client crashes during training (seeded)", min=0.0, max=1.0)
    corrupt_fraction: float = _opt(0.0, "local runtime: chance a client sends non-finite values (seeded)",
                                   min=0.0, max=1.0)


@dataclass
class Config:
    method: str = _opt("flexlora", "fedit | zeropad | hetlora | replication | updatepad | orderedfold | flora | "
                       "flexlora | fedplora | ffa (default flexlora: docs/results/replication)")
    task: str = _opt("classify", "classify (encoder + classifier head) | generate-label (causal LM answers the label "
                     "word) | instruct (causal LM on prompt/response JSONL)",
                     choices=("classify", "generate-label", "instruct"))
    seed: int = _opt(0, "seed of everything: partitions, ranks, sampling, init, training")
    rounds: int = _opt(10, "federated rounds", min=1)
    runtime: str = _opt("local", "local (in-process) | flower (Flower simulation engine)")
    runtime_timeout_s: float = _opt(600.0, "flower runtime: seconds a round waits for replies before closing", min=1.0)
    threads: int = _opt(0, "torch CPU threads (0 = torch's default)", min=0)
    device: str = _opt("auto", "where the model trains and evaluates: auto (CUDA if present, else CPU) | cpu | cuda | "
                       "cuda:N | mps; what is sent, checkpointed and exported is CPU fp32 regardless")
    precision: str = _opt("fp32", "autocast precision of forward and backward passes: fp32 | bf16 | fp16 (with a loss "
                          "scaler) | auto (bf16 where the device has bf16 units: AVX-512 bf16 or AMX CPUs, Ampere+ "
                          "GPUs; else fp32); LoRA factors, head, optimizer state and aggregation stay fp32",
                          choices=("fp32", "bf16", "fp16", "auto"))
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    ranks: RanksConfig = field(default_factory=RanksConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    comm: CommConfig = field(default_factory=CommConfig)


# --------------------------------------------------------------------------- loading


def _hint(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean `{close[0]}`?)" if close else f" (known: {', '.join(choices)})"


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a field annotation; ints are accepted for floats."""
    origin = typing.get_origin(annotation)
    if origin in (list,):
        (inner,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"`{key}` must be a list, got {value!r}: write e.g. {key}=[1,2]")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool):
        if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
            raise ConfigError(f"`{key}` must be {annotation.__name__}, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")  # pragma: no cover - programming error


def _apply(target: Any, values: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(target))
    names = [f.name for f in fields(target)]
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key `{full}`{_hint(key, names)}")
        current = getattr(target, key)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"`{full}` is a table: set its keys, e.g. {full}.{fields(current)[0].name}=...")
            _apply(current, value, f"{full}.")
        else:
            setattr(target, key, _coerce(value, hints[key], full))


def _check_ranges(cfg: Any, prefix: str = "") -> None:
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            _check_ranges(value, f"{prefix}{f.name}.")
            continue
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"`{prefix}{f.name}` must be one of {', '.join(choices)}, got {value!r}"
                              f"{_hint(str(value), list(choices))}")
        items = value if isinstance(value, list) else [value]
        for v in items:
            if "min" in f.metadata and v < f.metadata["min"]:
                raise ConfigError(f"`{prefix}{f.name}` must be ≥ {f.metadata['min']}, got {v}")
            if "max" in f.metadata and v > f.metadata["max"]:
                raise ConfigError(f"`{prefix}{f.name}` must be ≤ {f.metadata['max']}, got {v}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=VALUE`` → (["a", "b"], value); VALUE is a TOML literal or else a bare string."""
    if "=" not in text:
        raise ConfigError(f"override `{text}` needs the form key=value, e.g. rounds=5")
    key, raw = text.split("=", 1)
    key, raw = key.strip(), raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def _nest(path: list[str], value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {path[-1]: value}
    for part in reversed(path[:-1]):
        out = {part: out}
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults ← TOML file ← ``key=value`` overrides, then range checks."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found: pass an existing .toml file (see configs/)")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{p} is not valid TOML: {err}") from None
        _apply(cfg, data)
    for text in overrides or []:
        path_parts, value = parse_override(text)
        _apply(cfg, _nest(path_parts, value))
    _check_ranges(cfg)
    if cfg.clients.per_round > cfg.clients.count:
        raise ConfigError(
            f"clients.per_round={cfg.clients.per_round} exceeds clients.count={cfg.clients.count}: lower per_round"
        )
    labels = cfg.data.labels
    if cfg.data.dataset == NODES and (len(set(labels)) < 2 or len(set(labels)) != len(labels)):
        raise ConfigError(f"data.dataset = {NODES} needs data.labels: at least 2 distinct label names in label order, "
                          f"e.g. data.labels=[\"business\",\"sport\"] (got {labels})")
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    return asdict(cfg)


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(tomli_w.dumps(to_dict(cfg)))


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every leaf key, for `fedrank config --help`-style listings."""
    rows = []
    for f in fields(cls):
        sub = typing.get_type_hints(cls)[f.name]
        if is_dataclass(sub):
            rows += describe(sub, f"{prefix}{f.name}.")
        else:
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            rows.append((f"{prefix}{f.name}", repr(default), f.metadata.get("help", "")))
    return rows

