"""Fill in the middle: the completions `suffix`.

A model trained for infilling has three special tokens; the prompt is laid out
prefix-suffix-middle (PSM) as llama.cpp's infill does it:

    [BOS] <prefix token> prefix <suffix token> suffix <middle token>

and the model writes the middle. A model without such tokens cannot honour a
suffix: the request is a 400 naming it (server/validation.py).
"""

# (prefix, suffix, middle) token spellings, one family each
FIM_TOKENS = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),        # Qwen2.5-Coder, StarCoder2, Granite
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),              # StarCoder, SantaCoder
    ("<PRE>", "<SUF>", "<MID>"),                                   # CodeLlama (GGUF)
    ("\u2581<PRE>", "\u2581<SUF>", "\u2581<MID>"),                 # CodeLlama (tokenizer.json)
    ("<\uff5cfim\u2581begin\uff5c>", "<\uff5cfim\u2581hole\uff5c>", "<\uff5cfim\u2581end\uff5c>"),  # DeepSeek-Coder
)


def fim_token_ids(tokenizer):
    """(prefix, suffix, middle) token ids of the first family the vocabulary has whole, or None."""
    for names in FIM_TOKENS:
        ids = [tokenizer.token_to_id(name) for name in names]
        if all(i is not None for i in ids):
            return tuple(ids)
    return None


def fim_ids(tokenizer, fim, prefix, suffix):
    """The PSM prompt's token ids; `fim` is fim_token_ids(tokenizer)."""
    pre, suf, mid = fim
    bos = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
    return (bos + [pre] + tokenizer.encode(prefix, add_bos=False, add_eos=False)
            + [suf] + tokenizer.encode(suffix, add_bos=False, add_eos=False) + [mid])
