"""The server configuration: one frozen `ServerConfig`, built and validated once.

Precedence, highest first:

  1. command-line flags        --max-num-seqs 32
  2. environment variables     LLM_MAX_NUM_SEQS=32   (LLM_ + the field name in capitals,
                                                      or a name in ENV_ALIASES)
  3. a TOML file               max_num_seqs = 32     (--config FILE, or LLM_CONFIG=FILE; flat keys)
  4. the defaults below

ENV_ALIASES holds the names operators already set for other servers
(LLM_INFERENCE_PORT, CORS_ALLOWED_ORIGINS, ...), FLAG_ALIASES second flag
names (--sse-keepalive); where both an alias and the
LLM_<FIELD> name are set, the LLM_<FIELD> name wins. An LLM_* variable that
names no setting is logged as a warning (`warn_unknown_env`, called once logging
is set up), never silently dropped.
List settings (models, api_key, allowed_origins) take a comma-separated string
from the environment, a repeated flag or a TOML array.

Flag names follow vLLM / llama-server where the meaning is the same. Every
value, whatever its source, goes through the same parser, so a bad one raises
ValueError naming the field and where it came from ("max_num_seqs: must be
>= 1, got 0 (from LLM_MAX_NUM_SEQS)"). Unknown TOML keys are errors too: a
typo must not silently fall back to a default.
"""
import dataclasses
import logging
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from pyforge.backends import kv_dtype
from pyforge.builtin_templates import NAMED_TEMPLATES     # --chat-template NAME, for models that ship none
from pyforge.engine.config import SpeculativeConfig
from pyforge.engine.sampling_params import MAX_TEMPERATURE, POOLINGS
from pyforge.loader.quantize import QUANTIZATIONS, check_backend, parse_quantization

if sys.version_info >= (3, 11):
    import tomllib
else:                                   # pragma: no cover - Python 3.10
    import tomli as tomllib

ENV_PREFIX = "LLM_"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("json", "pretty")
TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral", "generic")   # server/tools/formats.py FORMATS
REASONING_PARSERS = ("deepseek_r1", "qwen3")                          # both write <think>...</think>
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
_URL = re.compile(r"https?://[^\s/]+(/\S*)?")
_log = logging.getLogger("pyforge.config")


@dataclass(frozen=True)
class ServerConfig:
    model: str | None = None            # GGUF file, HF folder, repo id or repo:file.gguf[@tokenizer-repo]
    models: tuple = ()                  # several of those, one engine each; a request's `model` picks one
    strict_model_name: bool = False     # one model served: 404 a request naming another (else it answers)
    host: str = "127.0.0.1"             # address to listen on; several: comma-separated (127.0.0.1,::1)
    port: int = 8000
    served_model_name: str | None = None  # the `model` clients send; default: the model file's stem
    workers: int = 2                    # gunicorn worker processes
    worker_threads: int = 32            # gthread threads per worker = concurrent requests per worker
    threads: int | None = None          # engine CPU threads; None: physical cores
    device: str = "auto"                # auto: cuda when CuPy sees a GPU, else cpu
    gpu_memory_utilization: float = 0.9  # cuda: share of device memory for weights + KV cache (vLLM's flag)
    cuda_graphs: bool = False           # cuda: replay small decode steps as CUDA graphs
    quantization: str = "none"          # quantize float matmul weights at load: none | q8_0 | q4_k | q4_0
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None    # None: the model's context length
    kv_cache_tokens: int | None = None  # None: the engine's default pool size
    block_size: int = 16
    kv_cache_dtype: str = "auto"        # backends/kv_dtype.py: auto | f32 | f16 | bf16 | q8_0 | fp8_e4m3
    queue_capacity: int = 256           # waiting requests before 503 + Retry-After
    default_max_tokens: int = 1024      # when a request sets no max_tokens
    max_tokens_limit: int | None = None  # largest max_tokens accepted; None: the context decides
    default_temperature: float | None = None  # when a request sets none; None: 1.0 (OpenAI's)
    default_top_p: float | None = None  # when a request sets none; None: 1.0
    max_concurrent_requests: int | None = None  # generation requests in flight per server; 503 above
    enable_prefix_caching: bool = True  # reuse the KV blocks of prompt prefixes seen before
    speculative_config: str | None = None  # vLLM's JSON, method "ngram" (engine/speculative.py); None: off
    pooling: str = "last"               # /v1/embeddings: the final hidden state's last row, or the mean of all
    max_body_bytes: int = 8 << 20
    api_key: tuple | None = None        # accepted keys (Authorization: Bearer / X-Api-Key); None: open
    api_key_file: str | None = None     # a file of keys, one per line (# comments), added to api_key
    allowed_origins: tuple = ()         # CORS: origins browsers may call from ("*": any); (): none
    allow_credentials: bool = False     # CORS: pages may send cookies / HTTP auth (vLLM's --allow-credentials)
    allowed_methods: tuple = ()         # CORS preflight methods; (): GET, POST, OPTIONS
    allowed_headers: tuple = ()         # CORS preflight headers ("*" allowed); (): the ones the page asks for
    ssl_enabled: bool | None = None     # https; None: on when ssl_certfile and ssl_keyfile are given
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    chat_template: str | None = None    # a file path or an inline Jinja template
    tool_call_parser: str | None = None  # tool-call format (vLLM's flag); None: detected from the chat template
    reasoning_parser: str | None = None  # <think> block format (vLLM's flag); None: no reasoning split
    log_level: str = "info"
    log_format: str = "pretty"
    service_name: str = "pyforge"       # the service in logs and traces
    otlp_endpoint: str | None = None    # OpenTelemetry OTLP/HTTP collector (http://host:4318); None: no traces
    drain_timeout: float = 30.0         # seconds in-flight requests get on SIGTERM
    keepalive_interval: float = 15.0    # SSE comment after this many seconds without a token
    stall_timeout: float = 600.0        # give a request up after this long without any engine event
    request_read_timeout: float = 10.0  # seconds a client gets to send a whole request (head and body)
    worker_connections: int = 4096      # open connections per worker (held, reading or idle)
    max_engine_restarts: int = 5        # engine crashes within ten minutes before the server gives up
    engine_heartbeat_timeout: float = 30.0  # seconds without an engine heartbeat before ready turns 503
    playground: bool = True             # the web playground at GET / (llama-server: --no-webui)
    null_model: bool = False            # skip the forward pass (serving-stack ceiling benchmarks)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _parse(f.name, getattr(self, f.name)))
        _check_relations(self)
        if self.served_model_name is None and self.model is not None:
            object.__setattr__(self, "served_model_name", default_model_name(self.model))

    @classmethod
    def from_sources(cls, args=None, env=None, toml_path=None):
        """Merge flags (an argparse Namespace from add_arguments; None = not given),
        `env` (default os.environ) and the TOML file (toml_path, else --config,
        else LLM_CONFIG) over the defaults."""
        env = os.environ if env is None else env
        flags = {k: v for k, v in (vars(args) if args else {}).items() if v is not None and k in _FIELDS}
        toml_path = toml_path or getattr(args, "config", None) or env.get(ENV_PREFIX + "CONFIG")
        layers = [(_read_toml(toml_path), lambda name: str(toml_path)),
                  (_from_env(env), lambda name: _env_name(env, name)),
                  (flags, lambda name: "--" + name.replace("_", "-"))]
        values, origin = {}, {}
        for layer, source in layers:
            for name, value in layer.items():
                values[name], origin[name] = value, source(name)
        if not values.get("model") and not values.get("models"):
            raise ValueError("model: required (--model, LLM_MODEL, --models, LLM_ALLOWED_MODELS "
                             "or `model` in the TOML file)")
        try:
            return cls(**values)
        except _FieldError as e:
            where = f" (from {origin[e.field]})" if e.field in origin else ""
            raise ValueError(f"{e}{where}") from None

    @property
    def api_keys(self):
        """Every accepted key (api_key and the lines of api_key_file); empty: no auth."""
        keys = list(self.api_key or ())
        if self.api_key_file:
            with open(self.api_key_file, encoding="utf-8") as f:
                keys += [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
        return tuple(keys)

    @property
    def hosts(self):
        """The addresses to listen on: `host` split at commas."""
        return tuple(self.host.split(","))

    @property
    def tls(self):
        return bool(self.ssl_enabled if self.ssl_enabled is not None else self.ssl_certfile and self.ssl_keyfile)

    def per_model(self):
        """One config per served model (model set, models empty): `model` alone, or
        each of `models` named by its default name, with the engine threads shared out."""
        specs = list(self.models) or [self.model]
        if len(specs) == 1:
            return [dataclasses.replace(self, model=specs[0], models=())]
        threads = self.threads or _physical_cores()
        share = max(1, threads // len(specs))
        return [dataclasses.replace(self, model=spec, models=(), served_model_name=default_model_name(spec),
                                    threads=share) for spec in specs]

    def load_chat_template(self):
        """The chat template's text (read from the file if it names one), or None."""
        if self.chat_template is None:
            return None
        if self.chat_template in NAMED_TEMPLATES:
            return NAMED_TEMPLATES[self.chat_template]
        path = Path(self.chat_template)
        return path.read_text(encoding="utf-8") if _is_file(path) else self.chat_template


def default_model_name(model):
    """'/models/llama-7b.Q4_K.gguf' -> 'llama-7b.Q4_K'; folders and repo ids stay as given;
    'org/repo-GGUF:file.gguf@org/tok' -> 'org/repo-GGUF:file.gguf' (the tokenizer is not part of it)."""
    model = model.rstrip("/").split("@", 1)[0] if ":" in model else model.rstrip("/")
    if ":" in model:
        return model
    return Path(model).name[:-len(".gguf")] if model.endswith(".gguf") else model


def warn_unknown_env(env=None):
    env = os.environ if env is None else env
    for name in unknown_env(env):
        _log.warning("ignoring the environment variable %s: it names no pyforge setting "
                     "(see `pyforge serve --help`)", name)
    if ISQ_TYPE in env and ISQ_ENABLE not in env:
        _log.warning("ignoring %s: in-situ quantization is off unless %s=true (or set %sQUANTIZATION)",
                     ISQ_TYPE, ISQ_ENABLE, ENV_PREFIX)


def unknown_env(env):
    """The LLM_* variables in env that name no setting, sorted."""
    known = {ENV_PREFIX + name.upper() for name in _FIELDS} | set(ENV_ALIASES) | {ENV_PREFIX + "CONFIG"}
    known |= {ISQ_ENABLE, ISQ_TYPE}
    return sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in known)


def add_arguments(parser):
    """Add the server flags to an argparse parser; every default is None (= not given)."""
    for f in dataclasses.fields(ServerConfig):
        flags = ("--" + f.name.replace("_", "-"), *FLAG_ALIASES.get(f.name, ()))
        if f.name in _LIST_FIELDS:          # repeatable, and each may hold commas
            parser.add_argument(*flags, dest=f.name, default=None, action="append", help=_help(f))
            continue
        if f.type is bool or f.type == "bool":      # `--null-model` alone means true; `--null-model false` too
            parser.add_argument(*flags, dest=f.name, default=None, nargs="?", const="true", metavar="BOOL",
                                help=_help(f))
            continue
        parser.add_argument(*flags, dest=f.name, default=None, help=_help(f))
    parser.add_argument("--config", default=None, metavar="FILE",
                        help=f"TOML file of settings (flags > {ENV_PREFIX}* env > file > defaults)")
    return parser


def _help(field):
    """The flag's help with its default and its environment names, for `--help`."""
    names = [ENV_PREFIX + field.name.upper()] + [k for k, v in ENV_ALIASES.items() if v == field.name]
    names += [f"{ISQ_ENABLE}=true + {ISQ_TYPE}"] if field.name == "quantization" else []
    default = field.default
    shown = ",".join(default) if isinstance(default, tuple) and default else default
    shown = "none" if shown in (None, ()) else shown
    return f"{_HELP.get(field.name, '')} [default: {shown}; env: {', '.join(names)}]".replace("%", "%%")


def _physical_cores():
    from pyforge.backends import default_threads
    return default_threads()


# -- parsing and validation ------------------------------------------------

class _FieldError(ValueError):
    def __init__(self, field, message):
        super().__init__(f"{field}: {message}")
        self.field = field


def _int(low=None, optional=False):
    def parse(name, value):
        if optional and _is_none(value):
            return None
        if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+\s*", value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _FieldError(name, f"must be an integer, got {value!r}")
        if low is not None and value < low:
            raise _FieldError(name, f"must be >= {low}, got {value}")
        return value
    return parse


def _float(low=0.0, low_open=False, high=None, optional=False):
    def parse(name, value):
        if optional and _is_none(value):
            return None
        try:
            value = float(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else value
        except ValueError:
            pass
        if not isinstance(value, float) or not math.isfinite(value):
            raise _FieldError(name, f"must be a number, got {value!r}")
        if value < low or (low_open and value == low):
            raise _FieldError(name, f"must be {'>' if low_open else '>='} {low:g}, got {value:g}")
        if high is not None and value > high:
            raise _FieldError(name, f"must be <= {high:g}, got {value:g}")
        return value
    return parse


def _str(optional=False, choices=None, pattern=None):
    def parse(name, value):
        if optional and (value is None or value == ""):
            return None
        if not isinstance(value, str) or not value:
            raise _FieldError(name, f"must be a non-empty string, got {value!r}")
        if choices and value.lower() not in choices:
            raise _FieldError(name, f"must be one of {', '.join(choices)}, got {value!r}")
        if pattern and not pattern.fullmatch(value):
            raise _FieldError(name, f"is not valid: {value!r}")
        return value.lower() if choices else value
    return parse


def _hosts(name, value):
    """One address or several, comma-separated; kept as "a,b" with the blanks taken out."""
    value = _str()(name, value)
    parts = [part.strip() for part in value.split(",")]
    if not all(parts):
        raise _FieldError(name, f"has an empty address: {value!r}")
    return ",".join(parts)


def _bool(name, value):
    if isinstance(value, str) and value.strip().lower() in _BOOLS:
        value = _BOOLS[value.strip().lower()]
    if not isinstance(value, bool):
        raise _FieldError(name, f"must be true or false, got {value!r}")
    return value


_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _list(name, value):
    """A tuple of non-empty strings from "a,b", ["a", "b,c"] or a TOML array."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
        raise _FieldError(name, f"must be a comma-separated string or a list of strings, got {value!r}")
    return tuple(part.strip() for item in items for part in item.split(",") if part.strip())


def _keys(name, value):
    keys = _list(name, value)
    return keys or None


def _optional_bool(name, value):
    return None if _is_none(value) else _bool(name, value)


def _quantization(name, value):
    try:
        return parse_quantization(value)
    except ValueError as e:
        raise _FieldError(name, str(e)) from None


def _speculative_config(name, value):
    """JSON text (flag, env) or a table (TOML) -> its canonical JSON text, or None (off)."""
    try:
        spec = SpeculativeConfig.parse(value)
    except (TypeError, ValueError) as e:
        raise _FieldError(name, str(e).removeprefix("speculative_config: ")) from None
    return None if spec is None else spec.to_json()


def _kv_cache_dtype(name, value):
    try:
        return kv_dtype.normalize(_str()(name, value))
    except ValueError as e:
        raise _FieldError(name, str(e).removeprefix("kv_cache_dtype ")) from None


def _chat_template(name, value):
    value = _str(optional=True)(name, value)
    if value is not None and value not in NAMED_TEMPLATES and not _is_file(Path(value)) and "{" not in value:
        raise _FieldError(name, f"is neither a file nor a Jinja template: {value!r}")
    return value


_PARSERS = {
    "model": _str(optional=True), "models": _list, "strict_model_name": _bool, "host": _hosts, "port": _int(0), "served_model_name": _str(optional=True),
    "workers": _int(1), "worker_threads": _int(1), "threads": _int(1, optional=True),
    "device": _str(pattern=_DEVICE), "gpu_memory_utilization": _float(low_open=True, high=1.0),
    "max_num_seqs": _int(1), "max_num_batched_tokens": _int(1),
    "max_model_len": _int(2, optional=True), "kv_cache_tokens": _int(1, optional=True),
    "block_size": _int(1), "kv_cache_dtype": _kv_cache_dtype, "queue_capacity": _int(1), "default_max_tokens": _int(1),
    "max_tokens_limit": _int(1, optional=True), "max_body_bytes": _int(1024),
    "default_temperature": _float(optional=True, high=MAX_TEMPERATURE),
    "default_top_p": _float(low_open=True, high=1.0, optional=True),
    "max_concurrent_requests": _int(1, optional=True), "enable_prefix_caching": _bool,
    "speculative_config": _speculative_config,
    "pooling": _str(choices=POOLINGS),
    "api_key": _keys, "api_key_file": _str(optional=True), "allowed_origins": _list,
    "allow_credentials": _bool, "allowed_methods": _list, "allowed_headers": _list, "playground": _bool,
    "ssl_enabled": _optional_bool, "ssl_certfile": _str(optional=True), "ssl_keyfile": _str(optional=True),
    "service_name": _str(), "otlp_endpoint": _str(optional=True, pattern=_URL), "chat_template": _chat_template,
    "tool_call_parser": _str(optional=True, choices=TOOL_CALL_PARSERS),
    "reasoning_parser": _str(optional=True, choices=REASONING_PARSERS),
    "log_level": _str(choices=LOG_LEVELS), "log_format": _str(choices=LOG_FORMATS),
    "drain_timeout": _float(), "keepalive_interval": _float(low_open=True),
    "stall_timeout": _float(low_open=True), "request_read_timeout": _float(low_open=True),
    "worker_connections": _int(1), "max_engine_restarts": _int(0),
    "engine_heartbeat_timeout": _float(low_open=True), "null_model": _bool, "cuda_graphs": _bool,
    "quantization": _quantization,
}
_FIELDS = frozenset(f.name for f in dataclasses.fields(ServerConfig))
_LIST_FIELDS = ("models", "api_key", "allowed_origins", "allowed_methods", "allowed_headers")

# Environment names other servers' operators already use -> our field.
ENV_ALIASES = {
    "LLM_INFERENCE_HOSTNAME": "host", "LLM_INFERENCE_PORT": "port", "LLM_MODEL_PATH": "model",
    "LLM_ALLOWED_MODELS": "models", "LLM_PAGED_ATTENTION_BLOCK_SIZE": "block_size",
    "LLM_PAGED_ATTENTION_CONTEXT_SIZE": "kv_cache_tokens", "CORS_ALLOWED_ORIGINS": "allowed_origins",
    "SERVER_SSL_ENABLED": "ssl_enabled", "TLS_SERVER_CERT_PATH": "ssl_certfile",
    "TLS_SERVER_KEY_PATH": "ssl_keyfile", "LOG_FORMAT": "log_format", "SERVICE_NAME": "service_name",
    "OTEL_SERVICE_NAME": "service_name", "OTEL_EXPORTER_OTLP_ENDPOINT": "otlp_endpoint",
    "LLM_SSE_KEEPALIVE": "keepalive_interval", "LLM_PAGED_CACHE_TYPE": "kv_cache_dtype",
}
# In-situ quantization as other servers name it: LLM_ENABLE_ISQ=true turns it on with the type
# LLM_ISQ_TYPE (default q8_0); LLM_ISQ_TYPE alone does nothing there, so nothing here either (warned).
ISQ_ENABLE, ISQ_TYPE, ISQ_DEFAULT_TYPE = "LLM_ENABLE_ISQ", "LLM_ISQ_TYPE", "q8_0"
# Second flag names of a field (another server's name for it).
FLAG_ALIASES = {"keepalive_interval": ("--sse-keepalive",)}
assert _FIELDS == set(_PARSERS), "every config field needs a parser"


def _parse(name, value):
    return _PARSERS[name](name, value)


def _check_relations(cfg):
    if cfg.model and cfg.models:
        raise _FieldError("models", "give either model or models, not both")
    if len(cfg.models) > 1 and cfg.served_model_name is not None:
        raise _FieldError("served_model_name", "names one model; with several models each is served under "
                                               "its default name (see --models)")
    if len(set(map(default_model_name, cfg.models))) != len(cfg.models):
        raise _FieldError("models", f"the same model twice: {', '.join(cfg.models)}")
    if cfg.ssl_enabled and not (cfg.ssl_certfile and cfg.ssl_keyfile):
        raise _FieldError("ssl_enabled", "https needs ssl_certfile and ssl_keyfile "
                                         "(TLS_SERVER_CERT_PATH, TLS_SERVER_KEY_PATH)")
    for name in ("ssl_certfile", "ssl_keyfile", "api_key_file"):
        path = getattr(cfg, name)
        if path is not None and not _is_file(Path(path)):
            raise _FieldError(name, f"no such file: {path}")
    if cfg.max_tokens_limit is not None and cfg.default_max_tokens > cfg.max_tokens_limit:
        raise _FieldError("default_max_tokens",
                          f"{cfg.default_max_tokens} exceeds max_tokens_limit ({cfg.max_tokens_limit})")
    if cfg.device.startswith("cuda"):
        try:
            check_backend(cfg.quantization, "cuda")
        except ValueError as e:
            raise _FieldError("quantization", str(e).split(": ", 1)[1]) from None
    if cfg.kv_cache_tokens is not None and cfg.kv_cache_tokens < cfg.block_size:
        raise _FieldError("kv_cache_tokens", f"must hold at least one block ({cfg.block_size} tokens)")


def _is_none(value):
    return value is None or (isinstance(value, str) and value.strip().lower() in ("", "none"))


def _is_file(path):
    try:
        return path.is_file()
    except OSError:                 # e.g. an inline template too long to be a file name
        return False


def _from_env(env):
    values = {field: env[alias] for alias, field in ENV_ALIASES.items() if alias in env}
    values.update(_isq_from_env(env))
    values.update({name: env[ENV_PREFIX + name.upper()] for name in _FIELDS if ENV_PREFIX + name.upper() in env})
    return values


def _isq_from_env(env):
    """{"quantization": type} from LLM_ENABLE_ISQ (+ LLM_ISQ_TYPE), or {} when it is not set."""
    if ISQ_ENABLE not in env:
        return {}
    enabled = env[ISQ_ENABLE].strip().lower()
    if enabled not in _BOOLS:
        raise ValueError(f"{ISQ_ENABLE}: must be true or false, got {env[ISQ_ENABLE]!r}")
    return {"quantization": env.get(ISQ_TYPE, ISQ_DEFAULT_TYPE) if _BOOLS[enabled] else "none"}


def _env_name(env, field):
    canonical = ENV_PREFIX + field.upper()
    if canonical in env:
        return canonical
    if field == "quantization" and ISQ_ENABLE in env:
        return ISQ_TYPE if ISQ_TYPE in env and _BOOLS.get(env[ISQ_ENABLE].strip().lower()) else ISQ_ENABLE
    return next(k for k, v in ENV_ALIASES.items() if v == field and k in env)


def _read_toml(path):
    if not path:
        return {}
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ValueError(f"config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"config file {path}: not valid TOML: {e}") from None
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise ValueError(f"config file {path}: unknown setting(s) {', '.join(unknown)} "
                         "(keys are field names with underscores, e.g. max_num_seqs)")
    return data


_HELP = {
    "model": "GGUF file, Hugging Face model folder, repo id, or repo:file.gguf[@tokenizer-repo] "
             "(repo ids resolve in the local Hugging Face cache; nothing is downloaded)",
    "models": "serve several models, one engine process each (entries as for --model; repeat the flag "
              "or separate with commas); a request's `model` picks one",
    "strict_model_name": "with one model served, answer a request naming another model with 404 "
                         "(default: the one model answers it)",
    "default_temperature": "temperature when a request sets none (default: 1.0)",
    "default_top_p": "top_p when a request sets none (default: 1.0)",
    "max_concurrent_requests": "generation requests in flight in the whole server; more get 503 + Retry-After",
    "enable_prefix_caching": "reuse the KV cache of prompt prefixes seen before",
    "speculative_config": "n-gram (prompt lookup) speculative decoding, as vLLM's JSON: "
                          '\'{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, '
                          '"prompt_lookup_min": 2, "disable_by_batch_size": 2}\' (only "method" is required; '
                          "no drafts in a step with more decoding sequences than disable_by_batch_size)",
    "pooling": "/v1/embeddings: pool the final hidden state (after the final norm) by its last token (what "
               "decoder embedding models such as e5-mistral and gte-Qwen are trained for) or the mean of "
               "every token; L2-normalised either way",
    "api_key_file": "file of accepted API keys, one per line",
    "allowed_origins": "CORS: origins browsers may call the API from (* for any; repeat or comma-separate)",
    "allow_credentials": "CORS: let pages send credentials (Access-Control-Allow-Credentials: true; with "
                         "--allowed-origins * the page's origin is echoed, as browsers require)",
    "allowed_methods": "CORS: methods a preflight allows (default: GET, POST, OPTIONS)",
    "allowed_headers": "CORS: headers a preflight allows (* for any; default: the headers the page asks for)",
    "playground": "serve the web playground at GET / (false: 404 there)",
    "ssl_enabled": "serve https (default: when --ssl-certfile and --ssl-keyfile are given)",
    "ssl_certfile": "TLS certificate chain (PEM)",
    "ssl_keyfile": "TLS private key (PEM)",
    "service_name": "service name in logs and traces",
    "otlp_endpoint": "OpenTelemetry collector (OTLP over HTTP, e.g. http://localhost:4318): a span per generation request",
    "host": "address to listen on; several comma-separated (127.0.0.1,::1)",
    "served_model_name": "model name clients use (default: the model file name without .gguf)",
    "workers": "HTTP worker processes",
    "worker_threads": "threads per HTTP worker (each holds one request or stream)",
    "threads": "engine CPU threads (default: physical cores)",
    "device": "auto (cuda when CuPy sees a GPU, else cpu), cpu, cuda or cuda:N",
    "gpu_memory_utilization": "cuda: fraction of the GPU's memory for weights, activations and the KV cache; "
                              "sizes the KV cache when --kv-cache-tokens is not given (0 < x <= 1)",
    "quantization": "quantize the F32/F16/BF16 matmul weights at load: " + "/".join(QUANTIZATIONS)
                    + " (q4_k: llama.cpp's Q4_K_M mix, Q6_K head; embeddings, norms and weights the "
                    "file already holds quantized stay as stored)",
    "cuda_graphs": "cuda: run decode steps of up to 8 sequences as captured CUDA graphs (fewer host launches)",
    "max_num_seqs": "most sequences decoded in one step",
    "max_num_batched_tokens": "most tokens (prefill + decode) in one step",
    "max_model_len": "context length (default: the model's)",
    "kv_cache_tokens": "KV cache size in tokens (default: about 2 GiB on cpu; on cuda, what "
                       "--gpu-memory-utilization leaves)",
    "block_size": "KV cache block size in tokens",
    "kv_cache_dtype": "KV cache element type: auto (cpu: the model's float type - f32, bf16, or f16 for F16 and "
                      "quantized weights; cuda: f16), f32, f16, bf16 or q8_0 (cpu), "
                      "fp8_e4m3 (cuda; alias f8e4m3)",
    "queue_capacity": "waiting requests before new ones get 503",
    "default_max_tokens": "max_tokens when a request sets none",
    "max_tokens_limit": "largest max_tokens a request may ask for",
    "max_body_bytes": "largest request body (413 above)",
    "api_key": "require an API key: Authorization: Bearer KEY or X-Api-Key: KEY (health endpoints and "
               "CORS preflights stay open); repeat or comma-separate for several",
    "chat_template": "chat template file, inline Jinja or a built-in name: " + "/".join(NAMED_TEMPLATES)
                     + " (overrides the model's; a model without one gets chatml)",
    "tool_call_parser": "how the model writes tool calls: " + "/".join(TOOL_CALL_PARSERS)
                        + " (default: detected from the chat template)",
    "reasoning_parser": "split a <think> block into reasoning_content: " + "/".join(REASONING_PARSERS)
                        + " (default: none)",
    "log_level": "/".join(LOG_LEVELS),
    "log_format": "/".join(LOG_FORMATS),
    "drain_timeout": "seconds in-flight requests get to finish on SIGTERM",
    "keepalive_interval": "seconds of silence before an SSE keep-alive comment",
    "stall_timeout": "seconds without engine output before a request fails with 503",
    "request_read_timeout": "seconds a client gets to send a whole request (headers and body); a slower "
                            "or stalled connection is closed without holding a worker thread",
    "worker_connections": "open connections per HTTP worker (reading, served or kept alive)",
    "max_engine_restarts": "engine crashes within ten minutes that the server restarts it after; one more "
                           "and it exits with status 1",
    "engine_heartbeat_timeout": "seconds without an engine heartbeat (a wedged engine: alive, not stepping) "
                                "before /health/ready answers 503; longer than the slowest step",
    "null_model": "skip the model's forward pass: every step emits one fixed token (measures the serving "
                  "stack's own ceiling; the output is meaningless)",
}
