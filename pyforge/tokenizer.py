"""Tokenizer: encode, decode, stream-decode and chat-template prompts.

Built on the `tokenizers` library, from a Hugging Face folder (`tokenizer.json`
+ configs) or from GGUF tokenizer metadata (converted in `tokenizer_gguf`).

Decoding does not go through `tokenizers`: each token id maps to the exact bytes
it stands for (U+2581 -> space and <0xNN> -> one byte for SentencePiece vocabs,
the GPT-2 byte alphabet for byte-level ones, raw text for added tokens), and text
is those bytes decoded as UTF-8 (invalid bytes -> U+FFFD). Because the mapping is
per token, `IncrementalDetokenizer` can stream with an incremental UTF-8 decoder
and its output always concatenates to exactly `decode(ids)`. SentencePiece vocabs
drop one leading space of the whole text, like HF's `Strip` / `Metaspace` decoders.
No `clean_up_tokenization_spaces`: decode(encode(text)) gives `text` back.

`encode` parses special-token text (`<|im_end|>`) into special ids by default, as
HF tokenizers and llama-server do for rendered chat prompts; pass `special=False`
for untrusted raw text (then only user-defined added tokens are matched, like
llama.cpp's `parse_special=false`).
"""
import codecs
import json
import re
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from pyforge.chat_template import CHATML_TEMPLATE, ChatTemplateError, compile_template, render
from pyforge.tokenizer_gguf import ALPHABET, CHAR_TO_BYTE, EOG_TEXTS, SPACE, build_from_gguf

__all__ = ["Tokenizer", "IncrementalDetokenizer", "ChatTemplateError", "CHATML_TEMPLATE"]

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_TO_LATIN1 = {ord(c): b for c, b in CHAR_TO_BYTE.items()}   # byte alphabet -> chr(byte)


class Tokenizer:
    def __init__(self, tk, *, family, strip_leading_space, skip_ids, bos_id, eos_id, eos_ids, add_bos, add_eos,
                 chat_template, template_tokens):
        self._tk = tk                       # tokenizers.Tokenizer, used for encoding
        self._plain_tk = None               # copy that leaves special-token text alone (special=False)
        self.bos_id = bos_id
        self.eos_id = eos_id                # the configured EOS (what add_eos appends)
        self.eos_ids = frozenset(eos_ids)   # every id that ends generation (EOS, end-of-turn, ...)
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)
        self._skip_ids = frozenset(skip_ids)
        self._strip = strip_leading_space
        self._pieces = _piece_table(tk, family, self.vocab_size)   # id -> bytes
        self._template_tokens = template_tokens                    # bos_token, eos_token, ... for templates
        self.chat_template = chat_template

    # -- construction ------------------------------------------------------
    @classmethod
    def from_hf_folder(cls, path):
        """Load `tokenizer.json` plus `tokenizer_config.json`, `generation_config.json`,
        `special_tokens_map.json` and `chat_template.jinja` where present."""
        folder = Path(path)
        tk, spec = _load_tokenizer_json(folder / "tokenizer.json")
        config = _read_json(folder / "tokenizer_config.json")
        family, strip = _decoder_family(spec)
        skip_ids = {i for i, t in tk.get_added_tokens_decoder().items() if t.special}
        return cls(tk, family=family, strip_leading_space=strip, skip_ids=skip_ids,
                   chat_template=_hf_chat_template(folder, config), **_hf_special_ids(tk, folder, config))

    @classmethod
    def from_gguf_metadata(cls, meta):
        """Build from GGUF metadata already parsed into a dict (key -> Python value)."""
        return cls(**build_from_gguf(meta))

    # -- encode / decode ---------------------------------------------------
    def encode(self, text, add_bos=None, *, special=True, add_eos=None):
        """Token ids of `text`; `add_bos=None` / `add_eos=None` follow the model's defaults."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        tk = self._tk if special else self._plain()
        ids = tk.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if (self.add_eos if add_eos is None else add_eos) and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids, skip_special_tokens=True):
        data = b"".join(self.token_to_piece(i, skip_special_tokens) for i in ids)
        text = data.decode("utf-8", "replace")
        return text[1:] if self._strip and text.startswith(" ") else text

    def token_to_piece(self, token_id, skip_special_tokens=False):
        """The bytes token `token_id` stands for (b'' for an unknown id or a skipped special)."""
        token_id = int(token_id)
        if not 0 <= token_id < len(self._pieces) or (skip_special_tokens and token_id in self._skip_ids):
            return b""
        return self._pieces[token_id]

    def id_to_token(self, token_id):
        """The vocabulary string of `token_id` (e.g. '▁Hello', 'Ġworld'), or None."""
        return self._tk.id_to_token(int(token_id))

    def token_to_id(self, token):
        return self._tk.token_to_id(token)

    def is_special(self, token_id):
        return token_id in self._skip_ids

    @property
    def backend(self):
        """The underlying `tokenizers.Tokenizer` (vocabulary access, reference checks)."""
        return self._tk

    def _plain(self):
        if self._plain_tk is None:
            plain = HFTokenizer.from_str(self._tk.to_str())
            plain.encode_special_tokens = True
            self._plain_tk = plain
        return self._plain_tk

    # -- chat templates ----------------------------------------------------
    @property
    def chat_template(self):
        return self._chat_template

    @chat_template.setter
    def chat_template(self, source):
        self._chat_template = source or None
        self._compiled = None

    @property
    def has_chat_template(self):
        return self._chat_template is not None

    def apply_chat_template(self, messages, add_generation_prompt=True, continue_final_message=False, **kwargs):
        """Render `messages` ([{'role', 'content'}, ...]) with the model's template.

        Raises ChatTemplateError (a ValueError) when the model has no template: the
        tokenizer does not guess a format (the server falls back to ChatML, and says so).
        Set `tokenizer.chat_template = CHATML_TEMPLATE` (or any template) to choose one.
        `continue_final_message`: end inside the last message, without its end-of-turn
        (not with add_generation_prompt). Extra kwargs (tools, enable_thinking, ...) reach
        the template.
        """
        if self._chat_template is None:
            raise ChatTemplateError("this model has no chat template; pass one explicitly "
                                    "(e.g. --chat-template) or use the completions API")
        if self._compiled is None:
            self._compiled = compile_template(self._chat_template)
        context = {**self._template_tokens, **kwargs}
        return render(self._compiled, messages, add_generation_prompt=add_generation_prompt,
                      continue_final_message=continue_final_message, **context)


def load_tokenizer(model_file):
    """The tokenizer of a loaded model file (pyforge.loader.load_model_file): from its
    GGUF metadata or its folder's tokenizer.json. Workers call this without loading
    the engine's compiled modules."""
    kind, source = model_file.tokenizer_source
    return Tokenizer.from_gguf_metadata(source) if kind == "gguf" else Tokenizer.from_hf_folder(source)


class IncrementalDetokenizer:
    """Streams text token by token: `feed(id)` returns only complete characters, so a
    character split over several byte tokens appears once whole; `flush()` ends the stream.
    "".join(feed outputs) + flush() == tokenizer.decode(all ids), always.

    With `prefix_ids` (the prompt) the stream continues that text instead of starting one,
    so a SentencePiece "▁world" right after the prompt keeps its space (as vLLM and
    llama-server do): outputs concatenate to decode(prefix + ids)[len(decode(prefix)):]
    whenever the prompt ends on a whole character.
    """

    def __init__(self, tokenizer, skip_special_tokens=True, prefix_ids=()):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._strip_pending = tokenizer._strip      # the leading space is dropped once, at the start
        if prefix_ids:      # the state feeding them one by one leaves
            self.feed_many(prefix_ids)

    def feed(self, token_id):
        return self._emit(self._utf8.decode(self._tokenizer.token_to_piece(token_id, self._skip)))

    def feed_many(self, token_ids):
        """What feed() of each id in turn returns, joined: one UTF-8 decode of all their bytes."""
        piece = self._tokenizer.token_to_piece
        return self._emit(self._utf8.decode(b"".join(piece(t, self._skip) for t in token_ids)))

    def flush(self):
        text = self._emit(self._utf8.decode(b"", final=True))
        self._utf8.reset()
        return text

    def _emit(self, text):
        if self._strip_pending and text:
            self._strip_pending = False
            if text[0] == " ":
                return text[1:]
        return text


# -- helpers -------------------------------------------------------------------
def _piece_table(tk, family, size):
    """Bytes of every id (see module doc); added tokens are their raw text."""
    pieces = [b""] * size
    for token, i in tk.get_vocab(with_added_tokens=False).items():
        if 0 <= i < size:
            pieces[i] = _model_piece(tk, token, i, family)
    for i, added in tk.get_added_tokens_decoder().items():
        if 0 <= i < size:
            pieces[i] = added.content.encode("utf-8")
    return pieces


def _model_piece(tk, token, token_id, family):
    if family == "byte_level":
        # A token outside the byte alphabet is raw text (HF and llama.cpp read it so too).
        in_alphabet = set(token) <= ALPHABET
        return token.translate(_TO_LATIN1).encode("latin-1") if in_alphabet else token.encode("utf-8")
    if family == "spm":
        byte = _BYTE_TOKEN.fullmatch(token)
        return bytes([int(byte.group(1), 16)]) if byte else token.replace(SPACE, " ").encode("utf-8")
    return tk.decode([token_id], skip_special_tokens=False).encode("utf-8")   # best effort


def _decoder_family(spec):
    """('byte_level' | 'spm' | 'other', strip one leading space?) from tokenizer.json's decoder."""
    decoder = spec.get("decoder") or {}
    steps = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    types = {step.get("type") for step in steps}
    if "ByteLevel" in types:
        return "byte_level", False
    spm_replace = any(s.get("type") == "Replace" and s.get("pattern", {}).get("String") == SPACE for s in steps)
    if "Metaspace" in types or spm_replace:
        return "spm", any(_strips_leading_space(step) for step in steps)
    return "other", False


def _strips_leading_space(step):
    if step.get("type") == "Strip":
        return step.get("start", 0) >= 1
    if step.get("type") == "Metaspace":        # old files say add_prefix_space, new ones prepend_scheme
        return step.get("add_prefix_space", True) and step.get("prepend_scheme", "always") != "never"
    return False


def _read_json(path, required=False):
    """Parsed JSON object of `path` ({} if absent); ValueError naming the file if malformed."""
    if not path.is_file():
        if required:
            hint = " (only tokenizer.model found: convert it to tokenizer.json)" \
                if (path.parent / "tokenizer.model").is_file() else ""
            raise ValueError(f"{path}: no such file{hint}")
        return {}
    try:
        value = json.loads(path.read_bytes())
    except ValueError as e:         # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path}: malformed JSON: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _token_text(value):
    """A special token from a config: 'text', {'content': 'text', ...} or None."""
    return value.get("content") if isinstance(value, dict) else value


def _load_tokenizer_json(path):
    spec = _read_json(path, required=True)
    try:
        return HFTokenizer.from_file(str(path)), spec
    except Exception as e:          # tokenizers raises plain Exception on a bad spec
        raise ValueError(f"{path}: not a valid tokenizer: {e}") from e


def _hf_special_ids(tk, folder, config):
    """bos/eos ids, add_bos/add_eos and the token strings templates see."""
    special_map = _read_json(folder / "special_tokens_map.json")
    names = {name: _token_text(config.get(name, special_map.get(name)))
             for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
    bos_id = tk.token_to_id(names["bos_token"]) if names["bos_token"] else None
    eos_id = tk.token_to_id(names["eos_token"]) if names["eos_token"] else None
    generation = _read_json(folder / "generation_config.json")
    gen_eos = generation.get("eos_token_id")
    gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
    eos_ids = {int(i) for i in [eos_id, *gen_eos] if i is not None}
    # End-of-turn tokens (<|eot_id|>, <|im_end|>, ...) stop generation too, as in llama.cpp.
    eos_ids.update(i for i, t in tk.get_added_tokens_decoder().items() if t.special and t.content in EOG_TEXTS)
    add_bos, add_eos = _hf_add_special(tk, config, bos_id, eos_id)
    return dict(bos_id=bos_id, eos_id=eos_id, eos_ids=eos_ids, add_bos=add_bos, add_eos=add_eos,
                template_tokens={k: v for k, v in names.items() if v})


def _hf_add_special(tk, config, bos_id, eos_id):
    """add_bos/add_eos from tokenizer_config, else from what the post-processor adds."""
    with_special = tk.encode("a", add_special_tokens=True).ids
    plain = tk.encode("a", add_special_tokens=False).ids
    added = len(with_special) > len(plain)
    add_bos = config.get("add_bos_token", added and bos_id is not None and with_special[0] == bos_id)
    add_eos = config.get("add_eos_token", added and with_special[-1] == eos_id)
    return bool(add_bos) and bos_id is not None, bool(add_eos) and eos_id is not None


def _hf_chat_template(folder, config):
    template = config.get("chat_template")
    if isinstance(template, list):     # named templates: [{'name': 'default', 'template': ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    jinja_file = folder / "chat_template.jinja"
    if template is None and jinja_file.is_file():
        template = jinja_file.read_text(encoding="utf-8")
    if template is None:
        template = _read_json(folder / "chat_template.json").get("chat_template")
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{folder / 'tokenizer_config.json'}: chat_template is not a string")
    return template
