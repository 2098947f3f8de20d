"""Model architectures over backend primitives.

`config.ModelConfig` describes a model's shape (built by `pyforge.loader`);
`llama.LlamaModel` runs the Llama-shaped families of `registry.FAMILIES` (Llama 2/3,
TinyLlama, Mistral, Qwen2/3, Phi-3, Granite, OLMo 2, SmolLM3, GLM-4), and
`gemma.GemmaModel`, built on it, Gemma 1, 2 and 3 (text).
"""
