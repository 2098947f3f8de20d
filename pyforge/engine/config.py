"""EngineConfig: what an Engine is built from, written down once. The launcher
makes it from the server's config and sends it to the engine process as JSON;
scripts and tests pass the same fields to Engine(model_path, **fields)."""
import dataclasses
from dataclasses import dataclass


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
    kv_cache_dtype: str = "auto"        # backends/kv_dtype.py: auto | f32 | f16 | bf16 | q8_0 | fp8_e4m3

    @classmethod
    def from_server_config(cls, config):
        """The engine part of a ServerConfig (pyforge/config.py)."""
        return cls(config.model, device=config.device, n_threads=config.threads,
                   max_model_len=config.max_model_len, kv_cache_tokens=config.kv_cache_tokens,
                   block_size=config.block_size, max_num_seqs=config.max_num_seqs,
                   max_num_batched_tokens=config.max_num_batched_tokens, null_model=config.null_model,
                   gpu_memory_utilization=config.gpu_memory_utilization, cuda_graphs=config.cuda_graphs,
                   enable_prefix_caching=config.enable_prefix_caching, kv_cache_dtype=config.kv_cache_dtype)

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
