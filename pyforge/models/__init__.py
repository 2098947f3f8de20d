"""Model architectures over backend primitives.

`config.ModelConfig` describes a model's shape (built by `pyforge.loader`);
`llama.LlamaModel` runs the Llama family (Llama 2/3, TinyLlama, Mistral, Qwen2),
`gemma.GemmaModel` Gemma 1, 2 and 3 (text).
"""
