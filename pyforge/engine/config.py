"""EngineConfig: what an Engine is built from, written down once. The launcher
makes it from the server's config and sends it to the engine process as JSON;
scripts and tests pass the same fields to Engine(model_path, **fields)."""
import dataclasses
import json
from dataclasses import dataclass, fields

MAX_SPECULATIVE_TOKENS = 32
MAX_NGRAM = 64                  # native/ngram_index.pyx's limit
SPECULATIVE_METHODS = ("ngram",)


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's --speculative-config, for its "ngram" method (the only one we have)."""
    method: str = "ngram"
    num_speculative_tokens: int = 4     # the most drafts one step verifies for one sequence
    prompt_lookup_max: int = 4          # the longest n-gram matched
    prompt_lookup_min: int = 2          # the shortest n-gram matched
    # a step with more decoding sequences than this runs no drafts. A CPU step stays memory-bound
    # up to ~7-10 tokens for a 1B model (Zen 4, 2 cores: a 26 ms decode step vs 3.6 ms per prompt
    # token): two sequences verifying 4 drafts each. A GPU's crossover is far larger: raise it there
    disable_by_batch_size: int = 2

    def __post_init__(self):
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_config: method must be one of {', '.join(SPECULATIVE_METHODS)}, "
                             f"got {self.method!r}")
        for f in fields(self)[1:]:
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"speculative_config: {f.name} must be an integer >= 1, got {value!r}")
        if self.num_speculative_tokens > MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative_config: num_speculative_tokens must be <= {MAX_SPECULATIVE_TOKENS}, "
                             f"got {self.num_speculative_tokens}")
        if not self.prompt_lookup_min <= self.prompt_lookup_max <= MAX_NGRAM:
            raise ValueError(f"speculative_config: need prompt_lookup_min <= prompt_lookup_max <= {MAX_NGRAM}, "
                             f"got {self.prompt_lookup_min} and {self.prompt_lookup_max}")

    @classmethod
    def parse(cls, value):
        """A SpeculativeConfig from JSON text or a dict (vLLM's shape: "method" required),
        or None for None / "" / "none" (off). Where only prompt_lookup_max is given the
        minimum is min(2, it)."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            if value.strip().lower() in ("", "none"):
                return None
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config: not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config: must be a JSON object, got {type(value).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"speculative_config: unknown key(s) {', '.join(unknown)} (known: {', '.join(known)})")
        if "method" not in value:
            raise ValueError('speculative_config: needs "method" ("ngram")')
        top = value.get("prompt_lookup_max")
        if "prompt_lookup_min" not in value and isinstance(top, int) and not isinstance(top, bool):
            value = {**value, "prompt_lookup_min": max(1, min(cls.prompt_lookup_min, top))}
        return cls(**value)

    def to_json(self):
        return json.dumps(dataclasses.asdict(self))


@dataclass(frozen=True)
class EngineConfig:
    model_path: str                     # GGUF file or Hugging Face model folder
    device: str = "cpu"                 # cpu | cuda | cuda:N | auto
    n_threads: int | None = None        # CPU threads; None: physical cores
    max_model_len: int | None = None    # None: the model's context length
    kv_cache_tokens: int | None = None  # None: sized by size_kv_cache (model_runner.py)
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    null_model: bool = False            # no forward pass (serving-stack benchmarks)
    gpu_memory_utilization: float = 0.9
    cuda_graphs: bool = False
    enable_prefix_caching: bool = True
    quantization: str = "none"          # float matmul weights quantized at load (loader/quantize.py)
    # n-gram speculative decoding (engine/speculative.py): a SpeculativeConfig, or vLLM's
    # --speculative-config JSON text or dict; None: off
    speculative_config: SpeculativeConfig | None = None
    kv_cache_dtype: str = "auto"        # backends/kv_dtype.py: auto | f32 | f16 | bf16 | q8_0 | fp8_e4m3

    def __post_init__(self):
        object.__setattr__(self, "speculative_config", SpeculativeConfig.parse(self.speculative_config))

    @classmethod
    def from_server_config(cls, config):
        """The engine part of a ServerConfig (pyforge/config.py)."""
        return cls(config.model, device=config.device, n_threads=config.threads,
                   max_model_len=config.max_model_len, kv_cache_tokens=config.kv_cache_tokens,
                   block_size=config.block_size, max_num_seqs=config.max_num_seqs,
                   max_num_batched_tokens=config.max_num_batched_tokens, null_model=config.null_model,
                   gpu_memory_utilization=config.gpu_memory_utilization, cuda_graphs=config.cuda_graphs,
                   enable_prefix_caching=config.enable_prefix_caching, quantization=config.quantization,
                   speculative_config=config.speculative_config, kv_cache_dtype=config.kv_cache_dtype)

    def to_dict(self):
        return dataclasses.asdict(self)


MAX_EOS_IDS = 32        # room for them in the segment header (native/pyforge_ipc.h)


@dataclass(frozen=True)
class EngineFacts:
    """What the engine decided and the HTTP workers obey, decided once: the engine
    process publishes them in the segment header (pyforge/ipc/segment.py) before
    READY, the in-process client reads them off the Engine."""
    max_model_len: int                  # prompt + output tokens a sequence may hold
    vocab_size: int                     # prompt ids must be below it
    eos_ids: frozenset                  # ids that end generation (not shown as text)
    hidden_size: int = 0                # an embedding's length (engine/pooling.py); 0: not told

    def __post_init__(self):
        if len(self.eos_ids) > MAX_EOS_IDS:
            raise ValueError(f"{len(self.eos_ids)} end-of-generation ids; the segment has room for {MAX_EOS_IDS}")
