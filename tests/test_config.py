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
    assert cfg.api_key == ("sk-env",)
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
    assert (cfg.max_model_len, cfg.max_num_batched_tokens, cfg.api_key) == (4096, 1024, ("k",))
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


def test_kv_cache_dtype_from_flag_env_and_alias():
    from pyforge.engine.config import EngineConfig

    assert ServerConfig.from_sources(parse(["--model", "m"]), env={}).kv_cache_dtype == "auto"
    flag = ServerConfig.from_sources(parse(["--model", "m", "--kv-cache-dtype", "Q8_0"]), env={})
    assert flag.kv_cache_dtype == "q8_0" and EngineConfig.from_server_config(flag).kv_cache_dtype == "q8_0"
    assert ServerConfig.from_sources(parse(["--model", "m"]), env={"LLM_KV_CACHE_DTYPE": "bf16"}).kv_cache_dtype == "bf16"
    alias = ServerConfig.from_sources(parse(["--model", "m"]), env={"LLM_PAGED_CACHE_TYPE": "f8e4m3"})
    assert alias.kv_cache_dtype == "fp8_e4m3"
    with pytest.raises(ValueError, match="kv_cache_dtype.*must be one of auto, f32, f16, bf16, q8_0, fp8_e4m3"):
        ServerConfig.from_sources(parse(["--model", "m", "--kv-cache-dtype", "int4"]), env={})


# -- the operators' settings (issue 11) ----------------------------------------------

def test_operator_env_names_are_aliases():
    env = {"LLM_INFERENCE_HOSTNAME": "0.0.0.0", "LLM_INFERENCE_PORT": "9100", "LLM_MODEL_PATH": "/m/a.gguf",
           "LLM_DEFAULT_TEMPERATURE": "0.2", "LLM_DEFAULT_TOP_P": "0.9", "LLM_DEFAULT_MAX_TOKENS": "64",
           "LLM_MAX_TOKENS_LIMIT": "128", "LLM_MAX_CONCURRENT_REQUESTS": "3", "LLM_PAGED_ATTENTION_BLOCK_SIZE": "32",
           "LLM_PAGED_ATTENTION_CONTEXT_SIZE": "8192", "LLM_ENABLE_PREFIX_CACHING": "false",
           "CORS_ALLOWED_ORIGINS": "https://a.example, https://b.example", "LOG_FORMAT": "json",
           "SERVICE_NAME": "inference", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    cfg = ServerConfig.from_sources(None, env=env)
    assert (cfg.host, cfg.port, cfg.model, cfg.served_model_name) == ("0.0.0.0", 9100, "/m/a.gguf", "a")
    assert (cfg.default_temperature, cfg.default_top_p, cfg.default_max_tokens, cfg.max_tokens_limit) == \
        (0.2, 0.9, 64, 128)
    assert (cfg.max_concurrent_requests, cfg.block_size, cfg.kv_cache_tokens) == (3, 32, 8192)
    assert cfg.enable_prefix_caching is False and cfg.log_format == "json"
    assert cfg.allowed_origins == ("https://a.example", "https://b.example")
    assert (cfg.service_name, cfg.otlp_endpoint) == ("inference", "http://127.0.0.1:4318")


def test_our_names_win_over_aliases_and_flags_over_both():
    env = {"LLM_INFERENCE_PORT": "9100", "LLM_PORT": "9200"}
    assert ServerConfig.from_sources(parse(["--model", "m"]), env=env).port == 9200
    assert ServerConfig.from_sources(parse(["--model", "m", "--port", "9300"]), env=env).port == 9300
    with pytest.raises(ValueError, match=r"port: must be an integer, got 'x' \(from LLM_INFERENCE_PORT\)"):
        ServerConfig.from_sources(parse(["--model", "m"]), env={"LLM_INFERENCE_PORT": "x"})


def test_unknown_llm_variables_are_logged_by_name(caplog):
    from pyforge.config import warn_unknown_env
    env = {"LLM_MAX_NUM_SEQ": "4", "LLM_ENABLE_TURBO": "true", "LLM_PORT": "9000", "OTHER": "x"}
    ServerConfig.from_sources(parse(["--model", "m"]), env=env)     # they do not stop it
    with caplog.at_level("WARNING", logger="pyforge.config"):
        warn_unknown_env(env)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "LLM_MAX_NUM_SEQ" in warned and "LLM_ENABLE_TURBO" in warned
    assert "LLM_PORT" not in warned and "OTHER" not in warned


def test_list_settings_from_every_source(tmp_path):
    args = parse(["--models", "a.gguf", "--models", "b.gguf,c.gguf", "--api-key", "k1", "--api-key", "k2"])
    cfg = ServerConfig.from_sources(args, env={})
    assert cfg.models == ("a.gguf", "b.gguf", "c.gguf") and cfg.api_key == ("k1", "k2") and cfg.model is None
    cfg = ServerConfig.from_sources(None, env={"LLM_ALLOWED_MODELS": "org/x, y.gguf"})
    assert cfg.models == ("org/x", "y.gguf")
    toml = write_toml(tmp_path, 'models = ["a.gguf", "b.gguf"]\nallowed_origins = "*"\n')
    cfg = ServerConfig.from_sources(None, env={}, toml_path=toml)
    assert cfg.models == ("a.gguf", "b.gguf") and cfg.allowed_origins == ("*",)
    with pytest.raises(ValueError, match="either model or models"):
        ServerConfig(model="a.gguf", models=("b.gguf",))
    with pytest.raises(ValueError, match="the same model twice"):
        ServerConfig(models=("x/a.gguf", "y/a.gguf"))


def test_per_model_configs_share_the_threads():
    cfg = ServerConfig(models=("/m/a.gguf", "org/repo-GGUF:b.Q4_K.gguf@org/tok"), threads=4)
    one, two = cfg.per_model()
    assert (one.model, one.served_model_name, one.threads, one.models) == ("/m/a.gguf", "a", 2, ())
    assert (two.served_model_name, two.threads) == ("org/repo-GGUF:b.Q4_K.gguf", 2)
    alone, = ServerConfig(model="/m/a.gguf", served_model_name="mine").per_model()
    assert (alone.served_model_name, alone.threads) == ("mine", None)


def test_api_keys_from_flag_and_file(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# team keys\nsk-one\n\n  sk-two  \n")
    cfg = ServerConfig(model="m", api_key=("sk-flag",), api_key_file=str(keys))
    assert cfg.api_keys == ("sk-flag", "sk-one", "sk-two")
    with pytest.raises(ValueError, match="api_key_file: no such file"):
        ServerConfig(model="m", api_key_file=str(tmp_path / "none"))


def test_tls_needs_both_files(tmp_path):
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("x")
    assert ServerConfig(model="m", ssl_certfile=str(cert), ssl_keyfile=str(key)).tls
    assert not ServerConfig(model="m", ssl_certfile=str(cert), ssl_keyfile=str(key), ssl_enabled=False).tls
    with pytest.raises(ValueError, match=r"ssl_enabled: https needs ssl_certfile and ssl_keyfile.*\(from SERVER_SSL_ENABLED\)"):
        ServerConfig.from_sources(parse(["--model", "m"]), env={"SERVER_SSL_ENABLED": "true"})


def test_help_shows_every_setting_with_default_and_env(capsys):
    from pyforge.cli import main
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(ServerConfig):
        assert "--" + f.name.replace("_", "-") in text
        assert "LLM_" + f.name.upper() in text
    assert "[default: 8000; env: LLM_PORT, LLM_INFERENCE_PORT]" in text


def test_version(capsys):
    from pyforge import __version__
    from pyforge.cli import main
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"pyforge {__version__}"


def test_readme_table_lists_every_setting_and_alias():
    from conftest import REPO
    from pyforge.config import ENV_ALIASES
    readme = (REPO / "README.md").read_text()
    for f in dataclasses.fields(ServerConfig):
        assert f"| `--{f.name.replace('_', '-')}` | `LLM_{f.name.upper()}`" in readme, f.name
    for alias in ENV_ALIASES:
        assert f"`{alias}`" in readme


# -- runtime quantization (loader/quantize.py) ----------------------------------

@pytest.mark.parametrize("argv, env, expected", [
    ([], {}, "none"),
    (["--quantization", "Q4_K_M"], {}, "q4_k"),
    ([], {"LLM_QUANTIZATION": "q8_0"}, "q8_0"),
    ([], {"LLM_ENABLE_ISQ": "true", "LLM_ISQ_TYPE": "Q4K"}, "q4_k"),
    ([], {"LLM_ENABLE_ISQ": "1"}, "q8_0"),                                   # the ISQ default type
    ([], {"LLM_ENABLE_ISQ": "false", "LLM_ISQ_TYPE": "q4_0"}, "none"),
    ([], {"LLM_ISQ_TYPE": "q4_0"}, "none"),                                  # alone: off, warned
    ([], {"LLM_ENABLE_ISQ": "true", "LLM_QUANTIZATION": "q4_0"}, "q4_0"),    # our name wins
    (["--quantization", "none"], {"LLM_ENABLE_ISQ": "true"}, "none"),        # and the flag over both
])
def test_quantization_from_flag_env_and_isq_names(argv, env, expected):
    from pyforge.engine.config import EngineConfig
    cfg = ServerConfig.from_sources(parse(["--model", "m", *argv]), env=env)
    assert cfg.quantization == expected
    assert EngineConfig.from_server_config(cfg).quantization == expected


@pytest.mark.parametrize("argv, env, message", [
    (["--quantization", "q3_k"], {}, "quantization: must be one of none, q8_0, q4_k, q4_0, got 'q3_k' (from --quantization)"),
    ([], {"LLM_ENABLE_ISQ": "true", "LLM_ISQ_TYPE": "hqq4"}, "got 'hqq4' (from LLM_ISQ_TYPE)"),
    ([], {"LLM_ENABLE_ISQ": "maybe"}, "LLM_ENABLE_ISQ: must be true or false, got 'maybe'"),
    (["--device", "cuda", "--quantization", "q4_0"], {}, "quantization: the cuda backend has no kernel for Q4_0"),
])
def test_bad_quantization_names_field_and_source(argv, env, message):
    with pytest.raises(ValueError) as e:
        ServerConfig.from_sources(parse(["--model", "m", *argv]), env=env)
    assert message in str(e.value)


def test_isq_names_are_known_and_a_lone_type_is_warned(caplog):
    from pyforge.config import unknown_env, warn_unknown_env
    env = {"LLM_ENABLE_ISQ": "true", "LLM_ISQ_TYPE": "q8_0"}
    assert unknown_env(env) == []
    with caplog.at_level("WARNING", logger="pyforge.config"):
        warn_unknown_env(env)
        assert caplog.text == ""
        warn_unknown_env({"LLM_ISQ_TYPE": "q8_0"})
    assert "ignoring LLM_ISQ_TYPE: in-situ quantization is off unless LLM_ENABLE_ISQ=true" in caplog.text

def test_speculative_config_takes_vllms_json_from_every_source(tmp_path):
    from pyforge.engine.config import EngineConfig, SpeculativeConfig

    flag = ServerConfig.from_sources(parse(["--model", "m", "--speculative-config",
                                            '{"method": "ngram", "num_speculative_tokens": 3}']), env={})
    toml = ServerConfig.from_sources(None, env={}, toml_path=write_toml(
        tmp_path, 'model = "m"\nspeculative_config = {method = "ngram", num_speculative_tokens = 3}\n'))
    assert flag.speculative_config == toml.speculative_config
    engine = EngineConfig.from_server_config(flag)
    assert engine.speculative_config == SpeculativeConfig(num_speculative_tokens=3)
    assert EngineConfig(**engine.to_dict()) == engine      # what crosses to the engine process as JSON
    assert ServerConfig(model="m").speculative_config is None
    with pytest.raises(ValueError, match=r"speculative_config: unknown key\(s\) draft_model .*LLM_SPECULATIVE_CONFIG"):
        ServerConfig.from_sources(None, env={"LLM_MODEL": "m",
                                             "LLM_SPECULATIVE_CONFIG": '{"method": "ngram", "draft_model": "x"}'})
