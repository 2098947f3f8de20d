"""A plain PyTorch Llama for the CUDA benchmark's comparison column.

Eager fp16, random weights made on the GPU, a contiguous KV cache
[batch, n_kv, max_len, head_dim] per layer, F.scaled_dot_product_attention.
It is what `model.half().cuda()` in a script gives, without transformers'
bookkeeping: the yardstick a user would try first, not a tuned server.
"""
import math
import time


class TorchLlama:
    def __init__(self, torch, cfg, batch, max_len):
        self.torch, self.cfg = torch, cfg
        dev, f16 = "cuda", torch.float16

        def w(*shape):
            return (torch.randn(*shape, device=dev, dtype=f16) * 0.02)

        d, q, kv, ffn = cfg.hidden_size, cfg.q_dim, cfg.kv_dim, cfg.ffn_size
        self.embed = w(cfg.vocab_size, d)
        self.head = w(cfg.vocab_size, d)
        self.layers = [dict(wqkv=w(q + 2 * kv, d), wo=w(d, q), w13=w(2 * ffn, d), w2=w(d, ffn),
                            n1=torch.ones(d, device=dev, dtype=f16), n2=torch.ones(d, device=dev, dtype=f16))
                       for _ in range(cfg.n_layers)]
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.cache = [(torch.zeros(shape, device=dev, dtype=f16), torch.zeros(shape, device=dev, dtype=f16))
                      for _ in range(cfg.n_layers)]
        inv = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=dev).float() / cfg.head_dim)
        angles = torch.outer(torch.arange(max_len, device=dev).float(), inv)
        self.cos, self.sin = angles.cos().to(f16), angles.sin().to(f16)

    def weight_bytes(self):
        mats = [t for layer in self.layers for k, t in layer.items() if k.startswith("w")] + [self.head]
        return sum(t.numel() * t.element_size() for t in mats)

    def rope(self, x, pos):          # x [B, H, T, hd], rotate-half
        c, s = self.cos[pos][None, None], self.sin[pos][None, None]
        x1, x2 = x.chunk(2, dim=-1)
        return self.torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)

    def rmsnorm(self, x, w):
        xf = x.float()
        return (xf * self.torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.cfg.rms_eps)).to(x.dtype) * w

    def forward(self, tokens, start):
        """tokens [B, T] at positions start..start+T-1: logits of the last position, float32 on the host."""
        torch, cfg, F = self.torch, self.cfg, self.torch.nn.functional
        B, T = tokens.shape
        pos = torch.arange(start, start + T, device="cuda")
        x = self.embed[tokens]
        for layer, (k_all, v_all) in zip(self.layers, self.cache):
            kc, vc = k_all[:B], v_all[:B]
            h = self.rmsnorm(x, layer["n1"])
            q, k, v = F.linear(h, layer["wqkv"]).split([cfg.q_dim, cfg.kv_dim, cfg.kv_dim], dim=-1)
            q = self.rope(q.view(B, T, cfg.n_heads, -1).transpose(1, 2), pos)
            k = self.rope(k.view(B, T, cfg.n_kv_heads, -1).transpose(1, 2), pos)
            kc[:, :, start:start + T], vc[:, :, start:start + T] = k, v.view(B, T, cfg.n_kv_heads, -1).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, kc[:, :, :start + T], vc[:, :, :start + T], is_causal=T > 1,
                                               enable_gqa=True, scale=1.0 / math.sqrt(cfg.head_dim))
            x = x + F.linear(a.transpose(1, 2).reshape(B, T, -1), layer["wo"])
            gate, up = F.linear(self.rmsnorm(x, layer["n2"]), layer["w13"]).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, layer["w2"])
        return F.linear(self.rmsnorm(x[:, -1], torch.ones_like(x[0, 0])), self.head).float().cpu()


def step_seconds(fn, warmup=2, min_steps=3, max_steps=30, budget_s=1.0):
    """Median wall time of fn() (which must synchronize), after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_steps or (len(times) < max_steps and time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def torch_rows(torch, cfg, batches, context, prefill_batch, prefill_len):
    """{("decode", B) | ("prefill", n_tokens): tokens/s} for the plain-torch model."""
    model = TorchLlama(torch, cfg, max(max(batches), prefill_batch), max(context + 1, prefill_len))
    out = measure(torch, model, batches, context, prefill_batch, prefill_len)
    del model
    torch.cuda.empty_cache()        # give the memory back for the next shape
    return out


def measure(torch, model, batches, context, prefill_batch, prefill_len):
    out, vocab = {}, model.cfg.vocab_size
    with torch.inference_mode():
        for b in batches:
            tokens = torch.randint(3, vocab, (b, 1), device="cuda")
            out[("decode", b)] = b / step_seconds(lambda tokens=tokens: model.forward(tokens, context))
        tokens = torch.randint(3, vocab, (prefill_batch, prefill_len), device="cuda")
        n = prefill_batch * prefill_len
        out[("prefill", n)] = n / step_seconds(lambda: model.forward(tokens, 0))
    return out
