"""GGUF tokenizer metadata -> a `tokenizers.Tokenizer` that encodes like llama.cpp.

The input is metadata already parsed into a plain dict (GGUF key -> Python value);
this module never reads files. Two vocabulary kinds (`tokenizer.ggml.model`):

- "llama": SentencePiece BPE. The file keeps pieces and scores but no merges.
  llama.cpp repeatedly merges the adjacent pair whose concatenation is the
  highest-scoring vocab piece, so we derive one merge for every way of cutting a
  piece into two vocab pieces, ranked by the whole piece's score. Spaces become
  U+2581, a U+2581 is prepended to each run of text (`add_space_prefix`), and
  characters missing from the vocab fall back to <0xNN> byte tokens.
- "gpt2": byte-level BPE with explicit merges. Text is first split with the
  regexes llama.cpp uses for `tokenizer.ggml.pre`, then mapped to the GPT-2
  byte alphabet.

Control (3) and unknown (2) tokens become special added tokens, user-defined (4)
tokens plain added tokens: like llama.cpp, those are matched whole in raw text.
"""
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"

# End-of-turn tokens that end generation besides EOS, known by their text as in llama.cpp
# (which also makes them control tokens). Unlike llama.cpp we leave out "</s>": in some
# vocabs (Qwen2) it is ordinary text, and where it is EOS the EOS id covers it.
EOG_TEXTS = frozenset({"<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>",
                       "<|endoftext|>", "<|end_of_text|>", "<EOT>"})


def _byte_alphabet():
    """GPT-2's reversible byte -> printable character map (bytes_to_unicode)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


BYTE_TO_CHAR = _byte_alphabet()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}
ALPHABET = frozenset(CHAR_TO_BYTE)

# --- pre-tokenizer split regexes, as llama.cpp applies them (in order) -------
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")      # single digits
_SPLITS = {
    "llama3": [_LLAMA3], "qwen2": [_QWEN2], "gpt2": [_GPT2],
    "starcoder": [r"\p{N}", _GPT2],
    "falcon": [r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"],
    "deepseek-coder": [r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}"],
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
}
# `tokenizer.ggml.pre` -> (split family, ignore_merges, default add_bos), from llama.cpp's vocab loader.
PRE_TOKENIZERS = {
    **{name: ("llama3", True, True) for name in ("llama3", "llama-v3", "llama-bpe", "falcon3")},
    **{name: ("llama3", False, False) for name in ("dbrx", "smaug-bpe")},
    **{name: ("qwen2", False, False) for name in ("qwen2", "stablelm2", "megrez", "deepseek-r1-qwen")},
    **{name: ("gpt2", False, False) for name in ("gpt-2", "phi-2", "mpt", "olmo", "jais", "roberta-bpe")},
    **{name: ("starcoder", False, False) for name in ("starcoder", "refact", "command-r", "smollm",
                                                      "codeshell", "exaone", "minerva-7b")},
    "falcon": ("falcon", False, False),
    "deepseek-coder": ("deepseek-coder", False, False),
    "default": ("default", False, False),
}


class _Meta:
    """Typed, error-reporting access to the metadata dict."""

    def __init__(self, meta):
        if not isinstance(meta, dict):
            raise ValueError(f"GGUF tokenizer metadata must be a dict, got {type(meta).__name__}")
        self.meta = meta

    def get(self, key, default=None):
        value = self.meta.get(key, default)
        return value.item() if hasattr(value, "item") and not hasattr(value, "__len__") else value

    def require(self, key):
        if key not in self.meta:
            raise ValueError(f"GGUF metadata: missing key {key!r}")
        return self.meta[key]

    def strings(self, key):
        return [t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t) for t in self.require(key)]

    def numbers(self, key, n, kind, default):
        if key not in self.meta:
            return [default] * n
        try:
            values = [kind(v) for v in self.meta[key]]
        except (TypeError, ValueError) as e:
            raise ValueError(f"GGUF metadata: {key!r} is not a list of numbers: {e}") from e
        if len(values) != n:
            raise ValueError(f"GGUF metadata: {key!r} has {len(values)} entries, tokenizer.ggml.tokens has {n}")
        return values

    def token_id(self, key, n, default=None):
        value = self.get(key, default)
        if value is None or not 0 <= int(value) < n:
            return None      # absent or out of range: llama.cpp ignores it too
        return int(value)


def build_from_gguf(meta):
    """Everything `Tokenizer.__init__` needs, from GGUF metadata (see module doc)."""
    m = _Meta(meta)
    kind = m.require("tokenizer.ggml.model")
    tokens = m.strings("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError("GGUF metadata: 'tokenizer.ggml.tokens' is empty")
    n = len(tokens)
    types = m.numbers("tokenizer.ggml.token_type", n, int, NORMAL)
    # End-of-turn tokens are control tokens whatever the file says (llama.cpp does the same):
    # matched whole in prompts, hidden when decoding.
    types = [CONTROL if t in EOG_TEXTS else ty for t, ty in zip(tokens, types)]
    if kind == "llama":
        space_prefix = bool(m.get("tokenizer.ggml.add_space_prefix", True))
        tk, family, strip, add_bos = _spm_tokenizer(m, tokens, types, space_prefix), "spm", space_prefix, True
    elif kind == "gpt2":
        (tk, add_bos), family, strip = _byte_level_tokenizer(m, tokens, types), "byte_level", False
    else:
        raise ValueError(f"GGUF metadata: tokenizer.ggml.model {kind!r} is not supported (llama, gpt2)")
    phi3 = "phi3" in str(m.get("general.name", "")).lower().replace("-", "")
    _add_special_tokens(tk, tokens, types, phi3)
    return dict(tk=tk, family=family, strip_leading_space=strip,
                skip_ids={i for i, ty in enumerate(types) if ty in (UNKNOWN, CONTROL, UNUSED)},
                **_special_ids(m, tokens, add_bos))


def _special_ids(m, tokens, add_bos_default):
    n, spm = len(tokens), m.get("tokenizer.ggml.model") == "llama"
    # Absent ids default as in llama.cpp: <s>=1, </s>=2, <unk>=0 for SentencePiece, none for BPE.
    bos = m.token_id("tokenizer.ggml.bos_token_id", n, 1 if spm else None)
    eos = m.token_id("tokenizer.ggml.eos_token_id", n, 2 if spm else None)
    eos_ids = {i for i in (eos, m.token_id("tokenizer.ggml.eot_token_id", n),
                           m.token_id("tokenizer.ggml.eom_token_id", n)) if i is not None}
    eos_ids |= {i for i, t in enumerate(tokens) if t in EOG_TEXTS}
    add_bos = bool(m.get("tokenizer.ggml.add_bos_token", add_bos_default)) and bos is not None
    add_eos = bool(m.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    names = {"bos_token": bos, "eos_token": eos,
             "unk_token": m.token_id("tokenizer.ggml.unknown_token_id", n, 0 if spm else None),
             "pad_token": m.token_id("tokenizer.ggml.padding_token_id", n)}
    return dict(bos_id=bos, eos_id=eos, eos_ids=eos_ids, add_bos=add_bos, add_eos=add_eos,
                chat_template=m.get("tokenizer.chat_template"),
                template_tokens={k: tokens[i] for k, i in names.items() if i is not None})


# --- SentencePiece ("llama") --------------------------------------------------
def _spm_tokenizer(m, tokens, types, space_prefix):
    scores = m.numbers("tokenizer.ggml.scores", len(tokens), float, 0.0)
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = m.token_id("tokenizer.ggml.unknown_token_id", len(tokens), 0)
    model = models.BPE(vocab, _spm_merges(tokens, scores, types, vocab), fuse_unk=True, byte_fallback=True,
                       unk_token=tokens[unk] if unk is not None else None)
    tk = HFTokenizer(model)
    replace = normalizers.Replace(" ", SPACE)
    decode = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if space_prefix:
        tk.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), replace])
        decode.append(decoders.Strip(" ", 1, 0))     # undo the prefix space on decode
    else:
        tk.normalizer = replace
    tk.decoder = decoders.Sequence(decode)
    return tk


def _spm_merges(tokens, scores, types, vocab):
    """Every (left, right) split of a normal piece into two vocab pieces, best score first."""
    ranked = []
    for i, piece in enumerate(tokens):
        if types[i] != NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], i, cut))
    ranked.sort()
    return [(tokens[i][:cut], tokens[i][cut:]) for _, i, cut in ranked]


# --- byte-level BPE ("gpt2") --------------------------------------------------
def _byte_level_tokenizer(m, tokens, types):
    pre = m.get("tokenizer.ggml.pre") or "default"      # llama.cpp also falls back to "default"
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"GGUF metadata: tokenizer.ggml.pre {pre!r} is not supported "
                         f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})")
    split, ignore_merges, add_bos = PRE_TOKENIZERS[pre]
    vocab = {}
    for i, t in enumerate(tokens):
        # Added tokens keep their raw text (they are matched in raw input); normal ones
        # outside the byte alphabet are respelled in it, as HF does.
        keep = types[i] in (CONTROL, USER_DEFINED, UNKNOWN) or set(t) <= ALPHABET
        vocab[t if keep else "".join(BYTE_TO_CHAR[b] for b in t.encode("utf-8"))] = i
    tk = HFTokenizer(models.BPE(vocab, _bpe_merges(m, vocab), ignore_merges=ignore_merges))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _SPLITS[split]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    return tk, add_bos


def _bpe_merges(m, vocab):
    merges = []
    for line in m.strings("tokenizer.ggml.merges"):
        cut = line.find(" ", 1)        # as llama.cpp: the first part may itself start with a space
        left, right = line[:cut], line[cut + 1:]
        # A merge whose result is missing could never yield a token; tokenizers rejects it.
        if cut > 0 and left in vocab and right in vocab and left + right in vocab:
            merges.append((left, right))
    return merges


def _add_special_tokens(tk, tokens, types, phi3):
    # llama.cpp strips whitespace after Phi-3's special tokens (except these three),
    # which is what the model was trained with.
    no_rstrip = {"<unk>", "<s>", "<|endoftext|>"}
    special, plain = [], []
    for t, ty in zip(tokens, types):
        if ty in (CONTROL, UNKNOWN, USER_DEFINED):
            rstrip = phi3 and t not in no_rstrip
            token = AddedToken(t, special=ty != USER_DEFINED, normalized=False, rstrip=rstrip)
            (plain if ty == USER_DEFINED else special).append(token)
    tk.add_special_tokens(special)
    tk.add_tokens(plain)
