"""pyforge.tokenizer against external references: the shared goldens, llama.cpp's
tokenizer (llama-cpp-python) on llama.cpp's own vocab GGUFs, HF `tokenizers` on
tokenizer.json, and transformers' chat-template renderer."""
import copy
import json
import pickle
import random

import numpy as np
import pytest

from conftest import SHARED, require_module
from pyforge.tokenizer import CHATML_TEMPLATE, ChatTemplateError, IncrementalDetokenizer, Tokenizer

MODELS, VOCAB = SHARED / "models", SHARED / "vocab"
TINYLLAMA, PHI3 = MODELS / "TinyLlama-1.1B-Chat-v1.0", MODELS / "Phi-3-mini-tokenizer"

TEXTS = [
    "", " ", "  ", "   ", "\t", "\n", "\n\n", " \n", "\r\n", "  \n  \n",
    "Hello world", " Hello world", "Hello World", "hello  world", "Hello world!", "   leading", "trailing   ",
    "multiple    spaces here", "line1\nline2\r\nline3", "tab\tseparated\tvalues", "12345678",
    "3.14159 and 1,000,000", "1 22 333 4444 55555 666666", "x=1+2*3; y = x**2",
    "Hello, world! How's it going? I'm fine; you're great.", "don't DON'T won't It'S", "a'b'c's",
    "¡¿Qué?!", "...", "!!!???", "$$$ 100% @user #tag", "café naïve résumé Ørsted Ñandú",
    "Ελληνικά русский текст", "你好，世界！今天天气很好。", "こんにちは世界 カタカナ", "안녕하세요 세계",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧", "🦙 llama", "mixed 中文 and English 123", "Ünïcödé 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "٠١٢٣ Arabic-indic ١٢٣٤", "\u00a0nbsp\u00a0", "a\u200bb zero-width", "\x00\x01 control\x7f",
    "def f(x):\n    return x * 2  # comment\n", "for (int i = 0; i < n; ++i) {\n\tprintf(\"%d\\n\", i);\n}",
    "<html><body class=\"x\">&amp;</body></html>", "https://example.com/path?q=1&r=2#frag",
    "The quick brown fox jumps over the lazy dog.", "ab" * 20,
]

# GGUFs compared with llama.cpp: llama.cpp's vocab files (llama-spm/-bpe, qwen2, gpt-2 required;
# the others cover SentencePiece added tokens and the multi-regex pre-tokenizers), and the
# trained stories260K model, whose 512-piece vocab leans hard on byte fallback.
GGUF_FILES = {name: VOCAB / f"ggml-vocab-{name}.gguf"
              for name in ["llama-spm", "llama-bpe", "qwen2", "gpt-2", "phi-3", "starcoder", "deepseek-coder"]}
GGUF_FILES["stories260K"] = MODELS / "stories260K" / "stories260K.gguf"
PHI3_PROMPT = "<|system|>\nYou are helpful.<|end|>\n<|user|>\nHello.<|end|>\n<|assistant|>\n"
PHI3_IDS = [32006, 887, 526, 8444, 29889, 32007, 32010, 15043, 29889, 32007, 32001]
# Text with special tokens, encoded with special=True and special=False. No "</s>" for phi-3:
# llama.cpp makes every "</s>" a control token (see test_gguf_special_ids_match_llama_cpp).
SPECIAL_TEXTS = {
    "llama-spm": ["<s>Hello</s> world", "<unk> x", " <s> a"],
    "phi-3": [PHI3_PROMPT, "<|endoftext|> y", "<|user|>  spaces"],
    "qwen2": ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "x<|endoftext|>y", "[PAD151650] z"],
    "llama-bpe": ["<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>", "a<|end_of_text|> b"],
    "gpt-2": ["a<|endoftext|>b", " <|endoftext|> "],
}


def read_gguf_metadata(path, cache_dir):
    """The tokenizer/general keys of a GGUF as a plain dict, read by the gguf package.
    GGUFReader needs ~10 s for a 150k vocab, so the dict is cached between runs."""
    stat = path.stat()
    cached = cache_dir / f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}.pickle"
    if cached.is_file():
        return pickle.loads(cached.read_bytes())
    reader = require_module("gguf").GGUFReader(str(path))
    meta = {key: field.contents() for key, field in reader.fields.items()
            if key.startswith(("tokenizer.", "general."))}
    cached.write_bytes(pickle.dumps(meta))
    return meta


@pytest.fixture(scope="module")
def gguf_tokenizer(pytestconfig):
    """name -> our Tokenizer for GGUF_FILES[name] (built once per module)."""
    cache_dir, built = pytestconfig.cache.mkdir("pyforge-gguf-tokenizer-metadata"), {}

    def get(name):
        if name not in built:
            built[name] = Tokenizer.from_gguf_metadata(read_gguf_metadata(GGUF_FILES[name], cache_dir))
        return built[name]
    return get


@pytest.fixture(scope="module")
def llama_cpp_vocab():
    """name -> llama_cpp.Llama loaded vocab-only on GGUF_FILES[name]."""
    llama_cpp, loaded = require_module("llama_cpp"), {}

    def get(name):
        if name not in loaded:
            loaded[name] = llama_cpp.Llama(model_path=str(GGUF_FILES[name]), vocab_only=True, verbose=False)
        return loaded[name]
    return get


@pytest.fixture(scope="module")
def tinyllama():
    return Tokenizer.from_hf_folder(TINYLLAMA)


@pytest.fixture(scope="module")
def phi3():
    return Tokenizer.from_hf_folder(PHI3)


@pytest.fixture(scope="module")
def llama3_folder(tmp_path_factory):
    """An HF folder for the shared Llama-3.2 BPE files, built with `tokenizers` the way
    Meta's tokenizer.json is: Llama-3 split regex + ByteLevel, ignore_merges, and a
    post-processor that adds <|begin_of_text|> (there is no add_bos_token in its config)."""
    tokenizers = require_module("tokenizers")
    src, folder = MODELS / "Llama-3.2-bpe-tokenizer", tmp_path_factory.mktemp("llama3")
    tk = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(str(src / "encoder.json"), str(src / "vocab.bpe"),
                                                              ignore_merges=True))
    split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Split(tokenizers.Regex(split), behavior="isolated"),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = tokenizers.decoders.ByteLevel()
    tk.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])          # 128000, 128001
    tk.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 128000)])
    tk.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


# -- goldens and tokenizer.json ---------------------------------------------------
def test_tinyllama_goldens(tinyllama):
    assert tinyllama.encode("The capital of France is") == [1, 450, 7483, 310, 3444, 338]
    assert tinyllama.encode("Hello world!", add_bos=False) == [15043, 3186, 29991]
    assert (tinyllama.bos_id, tinyllama.eos_ids, tinyllama.add_bos, tinyllama.vocab_size) == (1, {2}, True, 32000)


def test_hf_folder_matches_tokenizers(tinyllama, phi3):
    tokenizers = require_module("tokenizers")
    for ours, folder in ((tinyllama, TINYLLAMA), (phi3, PHI3)):
        ref = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        for text in TEXTS + [PHI3_PROMPT]:
            ids = ref.encode(text, add_special_tokens=False).ids
            assert ours.encode(text, add_bos=False) == ids, text
            assert ours.decode(ids) == ref.decode(ids), text
            assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False), text


def test_phi3_config(phi3):
    # tokenizer_config says add_bos_token false; <|end|> ends a turn besides EOS <|endoftext|>.
    assert phi3.encode(PHI3_PROMPT) == PHI3_IDS
    assert (phi3.add_bos, phi3.eos_id) == (False, 32000) and {32000, 32007} <= phi3.eos_ids


def test_hf_byte_level_folder(llama3_folder, gguf_tokenizer):
    ours = Tokenizer.from_hf_folder(llama3_folder)
    assert ours.encode("Hello, world!", add_bos=False) == [9906, 11, 1917, 0]
    assert ours.encode("The capital of France is") == [128000, 791, 6864, 315, 9822, 374]
    assert (ours.bos_id, ours.eos_ids, ours.add_bos) == (128000, {128001}, True)
    gguf = gguf_tokenizer("llama-bpe")      # llama.cpp's Llama-3 vocab: same pieces and merges
    for text in TEXTS:
        assert ours.encode(text) == gguf.encode(text), text
        assert ours.decode(ours.encode(text)) == text


def test_gguf_llama_spm_equals_tinyllama_tokenizer_json(gguf_tokenizer):
    tokenizers = require_module("tokenizers")
    ref = tokenizers.Tokenizer.from_file(str(TINYLLAMA / "tokenizer.json"))
    ours = gguf_tokenizer("llama-spm")
    for text in TEXTS:
        assert ours.encode(text, add_bos=False) == ref.encode(text, add_special_tokens=False).ids, text
        assert ours.encode(text) == ref.encode(text).ids, text     # both add BOS by default


# -- GGUF vocabularies against llama.cpp -------------------------------------------
@pytest.mark.parametrize("name", sorted(GGUF_FILES))
def test_gguf_encode_matches_llama_cpp(name, gguf_tokenizer, llama_cpp_vocab):
    ours, ref = gguf_tokenizer(name), llama_cpp_vocab(name)
    for text in TEXTS:
        # llama.cpp's add_bos=True means "add what the model adds", our add_bos=None.
        assert ours.encode(text, special=False) == ref.tokenize(text.encode(), add_bos=True, special=False), text
        assert ours.encode(text, add_bos=False, special=False) == ref.tokenize(text.encode(), add_bos=False,
                                                                               special=False), text


@pytest.mark.parametrize("name", sorted(SPECIAL_TEXTS))
def test_gguf_special_tokens_match_llama_cpp(name, gguf_tokenizer, llama_cpp_vocab):
    ours, ref = gguf_tokenizer(name), llama_cpp_vocab(name)
    for text in SPECIAL_TEXTS[name]:
        for special in (True, False):
            expected = ref.tokenize(text.encode(), add_bos=False, special=special)
            assert ours.encode(text, add_bos=False, special=special) == expected, (text, special)


@pytest.mark.parametrize("name", ["llama-spm", "llama-bpe", "qwen2", "gpt-2", "phi-3"])
def test_gguf_special_ids_match_llama_cpp(name, gguf_tokenizer, llama_cpp_vocab):
    llama_cpp = require_module("llama_cpp")
    ours, vocab = gguf_tokenizer(name), llama_cpp.llama_model_get_vocab(llama_cpp_vocab(name).model)
    eog = {i for i in range(ours.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, i)}
    # Deliberate difference: llama.cpp also ends generation on any token spelled "</s>"
    # (even Qwen2's plain-text one); we rely on the EOS id for that.
    eog -= {i for i in eog if ours.id_to_token(i) == "</s>" and i != ours.eos_id}
    assert ours.eos_ids == eog
    assert ours.bos_id == llama_cpp.llama_vocab_bos(vocab)
    assert ours.add_bos == llama_cpp.llama_vocab_get_add_bos(vocab)
    assert ours.vocab_size == llama_cpp.llama_vocab_n_tokens(vocab)


def test_stories260k_goldens(gguf_tokenizer):
    tok = gguf_tokenizer("stories260K")
    prompt = tok.encode("Once upon a time")
    assert prompt == [1, 403, 407, 261, 378]
    greedy = [432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337, 410, 408, 419, 292,
              411, 322, 265, 282, 295, 433, 426, 385, 328, 432, 358, 394, 261, 370, 432, 352, 266, 268, 388, 426]
    story = (", there was a little girl named Lily. She loved to play outside in the park."
             " One day, she saw a big, red ball.")
    assert tok.decode(greedy) == story
    assert "".join(stream(tok, greedy, prefix_ids=prompt)) == story


def test_gguf_phi3_prompt_golden(gguf_tokenizer):
    # llama.cpp strips whitespace after Phi-3's special tokens, as the HF tokenizer does.
    assert gguf_tokenizer("phi-3").encode(PHI3_PROMPT, add_bos=False) == PHI3_IDS


@pytest.mark.parametrize("name", ["llama-spm", "llama-bpe", "qwen2", "gpt-2", "phi-3"])
def test_gguf_decode_round_trips(name, gguf_tokenizer):
    ours = gguf_tokenizer(name)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ours.decode(ids) == text, text
        # Our byte table agrees with the tokenizers decoder chain built for the same vocab.
        assert ours.decode(ids, skip_special_tokens=False) == ours.backend.decode(ids, skip_special_tokens=False)


# -- streaming detokenization --------------------------------------------------------
def stream(tok, ids, **kwargs):
    detok = IncrementalDetokenizer(tok, **kwargs)
    return [detok.feed(i) for i in ids] + [detok.flush()]


def test_incremental_random_ids(tinyllama, gguf_tokenizer):
    rng = random.Random(1234)
    for tok in (tinyllama, gguf_tokenizer("qwen2"), gguf_tokenizer("llama-bpe")):
        for trial in range(200):
            ids = [rng.randrange(-2, tok.vocab_size + 3) for _ in range(rng.randrange(1, 48))]
            if trial % 2:       # mostly byte tokens: invalid and split UTF-8 on purpose
                ids = [rng.randrange(3, 259) if rng.random() < 0.8 else i for i in ids]
            skip = trial % 3 != 0
            assert "".join(stream(tok, ids, skip_special_tokens=skip)) == tok.decode(ids, skip_special_tokens=skip)


def test_a_prompt_prefix_leaves_the_state_feeding_it_token_by_token_would(tinyllama, gguf_tokenizer):
    rng = random.Random(99)
    for tok in (tinyllama, gguf_tokenizer("qwen2")):
        for trial in range(200):
            prefix, ids = ([rng.randrange(3, 259) if rng.random() < 0.6 else rng.randrange(tok.vocab_size)
                            for _ in range(rng.randrange(n))] for n in (12, 12))
            skip = trial % 2 == 0
            one_by_one = IncrementalDetokenizer(tok, skip_special_tokens=skip)
            for t in prefix:
                one_by_one.feed(t)
            at_once = IncrementalDetokenizer(tok, skip_special_tokens=skip, prefix_ids=prefix)
            assert [at_once.feed(i) for i in ids] + [at_once.flush()] == \
                [one_by_one.feed(i) for i in ids] + [one_by_one.flush()]


def test_feeding_many_tokens_at_once_gives_their_joined_text(tinyllama, gguf_tokenizer):
    rng = random.Random(7)
    for tok in (tinyllama, gguf_tokenizer("qwen2")):
        for trial in range(200):
            ids = [rng.randrange(3, 259) if rng.random() < 0.6 else rng.randrange(tok.vocab_size)
                   for _ in range(rng.randrange(1, 40))]
            one, many = IncrementalDetokenizer(tok), IncrementalDetokenizer(tok)
            cuts = sorted(rng.sample(range(len(ids) + 1), min(3, len(ids) + 1)))
            parts = [ids[a:b] for a, b in zip([0, *cuts], [*cuts, len(ids)])]
            assert [many.feed_many(p) for p in parts] == ["".join(one.feed(t) for t in p) for p in parts]
            assert many.flush() == one.flush()


def test_incremental_real_text_never_emits_partial_characters(tinyllama, gguf_tokenizer):
    for tok in (tinyllama, gguf_tokenizer("qwen2"), gguf_tokenizer("gpt-2")):
        for text in TEXTS:
            ids = tok.encode(text)
            pieces = stream(tok, ids)
            assert "".join(pieces) == tok.decode(ids) == text
            assert not any("\ufffd" in p for p in pieces), text


def test_incremental_spm_spaces_and_byte_fallback(tinyllama):
    # "▁Hello" "▁world": the leading space goes only at the very start.
    assert stream(tinyllama, [1, 15043, 3186]) == ["", "Hello", " world", ""]
    # An emoji spelled with four <0xNN> tokens appears once, on its last byte.
    ids = tinyllama.encode("😀", add_bos=False)
    assert [tinyllama.id_to_token(i) for i in ids] == ["▁", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert stream(tinyllama, ids) == ["", "", "", "", "😀", ""]
    # Continuing after a prompt keeps the space a suffix-only decode would drop.
    prompt = tinyllama.encode("Once upon")
    generated = [tinyllama.token_to_id("▁a"), tinyllama.token_to_id("▁time")]
    assert tinyllama.decode(generated) == "a time"
    assert "".join(stream(tinyllama, generated, prefix_ids=prompt)) == " a time"


def test_incremental_flush_ends_truncated_character(tinyllama):
    ids = tinyllama.encode("😀", add_bos=False)[:-1]      # cut the last byte token off
    pieces = stream(tinyllama, ids)
    assert pieces[-1] == "\ufffd" and "".join(pieces) == tinyllama.decode(ids)


# -- chat templates -------------------------------------------------------------------
CHATS = [
    [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hello."}],
    [{"role": "user", "content": "Hi <b> & \"q\""}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "2+2?"}],
]


def test_tinyllama_template(tinyllama):
    assert tinyllama.has_chat_template
    assert tinyllama.apply_chat_template(CHATS[0]) == \
        "<|system|>\nYou are helpful.</s>\n<|user|>\nHello.</s>\n<|assistant|>\n"


def test_phi3_template_golden_ids(phi3):
    text = phi3.apply_chat_template(CHATS[0])
    assert text == PHI3_PROMPT and phi3.encode(text) == PHI3_IDS


def reference_render(template, messages, add_generation_prompt, tokens):
    """transformers' renderer: (text, None) or (None, exception type name)."""
    utils = require_module("transformers.utils.chat_template_utils")
    try:
        rendered, _ = utils.render_jinja_template(conversations=[messages], chat_template=template,
                                                  add_generation_prompt=add_generation_prompt, **tokens)
        return rendered[0], None
    except Exception as e:      # the template refused the chat (e.g. a system turn)
        return None, type(e).__name__


def ollama_templates():
    entries = json.loads((MODELS / "ollama-chat-templates" / "index.json").read_text())
    return [pytest.param(e["template"], id=f"{i}-{e['name']}") for i, e in enumerate(entries)]


@pytest.mark.parametrize("template", ollama_templates())
def test_templates_match_transformers(template, tinyllama):
    tok = copy.copy(tinyllama)
    tok.chat_template = template
    for messages in CHATS:
        for add_generation_prompt in (True, False):
            expected, error = reference_render(template, messages, add_generation_prompt,
                                               {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                                "pad_token": "</s>"})
            if error:
                with pytest.raises(ChatTemplateError):
                    tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
            else:
                assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_qwen25_template_with_tools_matches_transformers(gguf_tokenizer):
    tok = copy.copy(gguf_tokenizer("qwen2"))
    tok.chat_template = json.loads((MODELS / "Qwen2.5-0.5B-Instruct" / "tokenizer_config.json").read_text())[
        "chat_template"]
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather <now>",
                                               "parameters": {"type": "object", "properties": {}}}}]
    messages = [{"role": "user", "content": "Weather in Zürich?"}]
    for kwargs in ({}, {"tools": tools}):
        tokens = dict.fromkeys(("bos_token", "eos_token", "pad_token"), "<|endoftext|>")
        expected, error = reference_render(tok.chat_template, messages, True, {**tokens, **kwargs})
        assert error is None and tok.apply_chat_template(messages, **kwargs) == expected
    text = tok.apply_chat_template(messages)
    assert "You are Qwen, created by Alibaba Cloud" in text and text.endswith("<|im_start|>assistant\n")
    assert '"description": "Weather <now>"' in tok.apply_chat_template(messages, tools=tools)   # HF's tojson


def test_chatml_default_is_explicit(gguf_tokenizer):
    tok = copy.copy(gguf_tokenizer("gpt-2"))
    assert not tok.has_chat_template
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.apply_chat_template(CHATS[0])
    tok.chat_template = CHATML_TEMPLATE
    assert tok.apply_chat_template(CHATS[0][1:]) == "<|im_start|>user\nHello.<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("template", [
    "{{ ''.__class__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{% if ''.__class__ %}x{% endif %}",
    "{{ messages.__init__.__globals__ }}",
    "{{ messages.append(1) }}",                       # immutable sandbox: no mutation
    "{{ raise_exception('system role not supported') }}",
    "{% if %}",
])
def test_template_failures_are_chat_template_errors(template, tinyllama):
    tok = copy.copy(tinyllama)
    tok.chat_template = template
    with pytest.raises(ChatTemplateError):
        tok.apply_chat_template(CHATS[0])


def test_raise_exception_message_reaches_caller(tinyllama):
    tok = copy.copy(tinyllama)
    tok.chat_template = "{{ raise_exception('system role not supported') }}"
    with pytest.raises(ValueError, match="system role not supported"):
        tok.apply_chat_template(CHATS[0])


# -- errors ----------------------------------------------------------------------------
def test_hf_folder_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_hf_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json: malformed JSON"):
        Tokenizer.from_hf_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": 1}')
    with pytest.raises(ValueError, match="tokenizer.json: not a valid tokenizer"):
        Tokenizer.from_hf_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((TINYLLAMA / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="tokenizer_config.json: malformed JSON"):
        Tokenizer.from_hf_folder(tmp_path)


SPM_META = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<unk>", "a", "b", "ab"],
            "tokenizer.ggml.scores": [0.0, -1.0, -2.0, -0.5], "tokenizer.ggml.token_type": [2, 1, 1, 1]}
# Readers may hand over numpy arrays and scalars rather than lists and ints.
SPM_META_NUMPY = {**SPM_META, "tokenizer.ggml.scores": np.array(SPM_META["tokenizer.ggml.scores"], np.float32),
                  "tokenizer.ggml.token_type": np.array([2, 1, 1, 1], np.int32),
                  "tokenizer.ggml.add_space_prefix": np.bool_(False), "tokenizer.ggml.bos_token_id": np.uint32(1)}


@pytest.mark.parametrize("change, message", [
    ({"tokenizer.ggml.model": None}, "missing key 'tokenizer.ggml.model'"),
    ({"tokenizer.ggml.model": "bert"}, "tokenizer.ggml.model 'bert' is not supported"),
    ({"tokenizer.ggml.tokens": None}, "missing key 'tokenizer.ggml.tokens'"),
    ({"tokenizer.ggml.scores": [0.0]}, "'tokenizer.ggml.scores' has 1 entries"),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2"}, "missing key 'tokenizer.ggml.merges'"),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "deepseek-llm", "tokenizer.ggml.merges": []},
     "tokenizer.ggml.pre 'deepseek-llm' is not supported"),
])
def test_gguf_metadata_errors_name_the_key(change, message):
    meta = {k: v for k, v in {**SPM_META, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        Tokenizer.from_gguf_metadata(meta)


@pytest.mark.parametrize("meta", [{**SPM_META, "tokenizer.ggml.add_space_prefix": False}, SPM_META_NUMPY])
def test_tiny_spm_metadata_merges_by_score(meta):
    tok = Tokenizer.from_gguf_metadata(meta)
    # "ab" scores higher than any split of it, so "abab" merges pairwise; "▁" is unknown -> <unk>.
    assert tok.encode("abab", add_bos=False) == [3, 3]
    assert tok.encode("ab ba", add_bos=False) == [3, 0, 2, 1]
    assert (tok.bos_id, tok.eos_ids) == (1, {2})     # llama.cpp's SentencePiece defaults
