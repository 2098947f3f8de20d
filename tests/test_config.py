"""ServerConfig: flags > LLM_* env > TOML > defaults, one parser for every source."""
import argparse
import dataclasses

import pytest

from pyforge.config import ServerConfig, add_arguments, default_model_name


def parse(argv):
    return add_arguments(argparse.ArgumentParser()).parse_args(argv)


def write_toml(tmp_path, text):
    path = tmp_path / "pyforge.toml"
    path.write_text(text)
    return path


def test_defaults():
    cfg = ServerConfig.from_sources(parse(["--model", "/m/llama-7b.Q4_K_M.gguf"]), env={})
    assert cfg.port == 8000 and cfg.max_num_seqs == 64 and cfg.api_key is None and cfg.max_model_len is None
    assert cfg.served_model_name == "llama-7b.Q4_K_M"
    assert dataclasses.is_dataclass(cfg)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.port = 1


def test_precedence_flags_over_env_over_toml_over_defaults(tmp_path):
    toml = write_toml(tmp_path, 'model = "from-toml"\nport = 7000\nmax_num_seqs = 8\nblock_size = 32\n'
                                'log_format = "json"\n')
    env = {"LLM_PORT": "7100", "LLM_MAX_NUM_SEQS": "16", "LLM_API_KEY": "sk-env", "UNRELATED": "x"}
    args = parse(["--max-num-seqs", "24", "--config", str(toml)])
    cfg = ServerConfig.from_sources(args, env=env)
    assert cfg.max_num_seqs == 24           # flag
    assert cfg.port == 7100                 # env beats TOML
    assert cfg.api_key == "sk-env"
    assert cfg.block_size == 32 and cfg.model == "from-toml" and cfg.log_format == "json"   # TOML
    assert cfg.queue_capacity == 256        # default


def test_toml_path_from_env(tmp_path):
    toml = write_toml(tmp_path, 'model = "m.gguf"\nworkers = 3\n')
    cfg = ServerConfig.from_sources(None, env={"LLM_CONFIG": str(toml)})
    assert cfg.workers == 3 and cfg.served_model_name == "m"


def test_vllm_flag_names():
    args = parse(["--model", "m", "--max-model-len", "4096", "--max-num-batched-tokens", "1024", "--api-key", "k",
                  "--served-model-name", "mine", "--host", "0.0.0.0", "--port", "9000", "--chat-template", "{{ x }}"])
    cfg = ServerConfig.from_sources(args, env={})
    assert (cfg.max_model_len, cfg.max_num_batched_tokens, cfg.api_key) == (4096, 1024, "k")
    assert (cfg.served_model_name, cfg.host, cfg.port, cfg.chat_template) == ("mine", "0.0.0.0", 9000, "{{ x }}")


@pytest.mark.parametrize("argv, env, message", [
    (["--max-num-seqs", "0"], {}, "max_num_seqs: must be >= 1, got 0 (from --max-num-seqs)"),
    ([], {"LLM_PORT": "http"}, "port: must be an integer, got 'http' (from LLM_PORT)"),
    ([], {"LLM_LOG_FORMAT": "xml"}, "log_format: must be one of json, pretty, got 'xml' (from LLM_LOG_FORMAT)"),
    (["--drain-timeout", "-1"], {}, "drain_timeout: must be >= 0, got -1 (from --drain-timeout)"),
    (["--keepalive-interval", "nan"], {}, "keepalive_interval: must be a number"),
    (["--device", "tpu"], {}, "device: is not valid: 'tpu' (from --device)"),
    (["--chat-template", "no/such/file.jinja"], {}, "chat_template: is neither a file nor a Jinja template"),
])
def test_bad_values_name_field_and_source(argv, env, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ServerConfig.from_sources(parse(["--model", "m", *argv]), env=env)


def test_bad_toml_values_and_keys(tmp_path):
    toml = write_toml(tmp_path, 'model = "m"\nblock_size = true\n')
    with pytest.raises(ValueError, match=rf"block_size: must be an integer, got True \(from {toml}\)"):
        ServerConfig.from_sources(None, env={}, toml_path=toml)
    toml = write_toml(tmp_path, 'model = "m"\nmax_num_seq = 4\n')
    with pytest.raises(ValueError, match="unknown setting.*max_num_seq"):
        ServerConfig.from_sources(None, env={}, toml_path=toml)
    toml = write_toml(tmp_path, 'model = \n')
    with pytest.raises(ValueError, match="not valid TOML"):
        ServerConfig.from_sources(None, env={}, toml_path=toml)
    with pytest.raises(ValueError, match="config file .*missing.toml"):
        ServerConfig.from_sources(None, env={}, toml_path=tmp_path / "missing.toml")


def test_model_is_required_and_relations_checked():
    with pytest.raises(ValueError, match="model: required"):
        ServerConfig.from_sources(parse([]), env={})
    with pytest.raises(ValueError, match="default_max_tokens: 1024 exceeds max_tokens_limit"):
        ServerConfig.from_sources(parse(["--model", "m", "--max-tokens-limit", "100"]), env={})


def test_optional_fields_can_be_unset_from_env():
    cfg = ServerConfig.from_sources(parse(["--model", "m"]), env={"LLM_MAX_MODEL_LEN": "none", "LLM_API_KEY": ""})
    assert cfg.max_model_len is None and cfg.api_key is None


def test_chat_template_by_name():
    from pyforge.chat_template import CHATML_TEMPLATE
    assert ServerConfig(model="m", chat_template="chatml").load_chat_template() == CHATML_TEMPLATE


def test_parser_flags_name_what_exists():
    from pyforge.config import TOOL_CALL_PARSERS
    from pyforge.server.tools import FORMATS
    assert set(TOOL_CALL_PARSERS) == set(FORMATS)
    with pytest.raises(ValueError, match="reasoning_parser"):
        ServerConfig(model="m", reasoning_parser="nope")


def test_chat_template_file_or_inline(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages }}")
    assert ServerConfig(model="m", chat_template=str(path)).load_chat_template() == "{{ messages }}"
    assert ServerConfig(model="m", chat_template="{% for m in messages %}{% endfor %}").load_chat_template() \
        .startswith("{%")
    assert ServerConfig(model="m").load_chat_template() is None


def test_default_model_name():
    assert default_model_name("/models/tiny.gguf") == "tiny"
    assert default_model_name("TinyLlama/TinyLlama-1.1B-Chat-v1.0") == "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    assert default_model_name("/models/llama/") == "/models/llama"


# -- --device and --gpu-memory-utilization (moved from tests/backends) ---------------

def test_device_defaults_to_auto_and_utilization_to_vllms():
    cfg = ServerConfig.from_sources(parse(["--model", "m"]), env={})
    assert (cfg.device, cfg.gpu_memory_utilization) == ("auto", 0.9)
    cfg = ServerConfig.from_sources(parse(["--model", "m", "--device", "cuda:1"]), env={"LLM_GPU_MEMORY_UTILIZATION": "0.5"})
    assert (cfg.device, cfg.gpu_memory_utilization) == ("cuda:1", 0.5)
    assert ServerConfig.from_sources(parse(["--model", "m", "--gpu-memory-utilization", "1"]), env={}).gpu_memory_utilization == 1.0


@pytest.mark.parametrize("value, message", [
    ("0", "gpu_memory_utilization: must be > 0, got 0 (from --gpu-memory-utilization)"),
    ("1.5", "gpu_memory_utilization: must be <= 1, got 1.5 (from --gpu-memory-utilization)"),
    ("most", "gpu_memory_utilization: must be a number"),
])
def test_bad_utilization_names_field_and_source(value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ServerConfig.from_sources(parse(["--model", "m", "--gpu-memory-utilization", value]), env={})


def test_engine_config_carries_device_and_utilization():
    from pyforge.engine.config import EngineConfig

    server = ServerConfig.from_sources(parse(["--model", "m", "--device", "cpu", "--gpu-memory-utilization", "0.7"]),
                                       env={})
    engine = EngineConfig.from_server_config(server)
    assert (engine.model_path, engine.device, engine.gpu_memory_utilization) == ("m", "cpu", 0.7)
    assert EngineConfig(**engine.to_dict()) == engine      # what crosses to the engine process as JSON
