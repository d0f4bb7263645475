"""nanoGPT's GPT in PyTorch, the reference of benchmarks/vs_pytorch.py: the model (pre-LayerNorm,
causal scaled_dot_product_attention, GELU MLP, tied embeddings, learned positions, nanoGPT's
init), its AdamW with nanoGPT's weight-decay groups, its learning rate, and one train step.
Built from a meshlm ModelConfig / optimizer section so both sides have the same shapes."""

import math

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.Module):
    def __init__(self, dim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class Block(nn.Module):
    def __init__(self, m):
        super().__init__()
        e, self.heads = m.embed_dim, m.num_heads
        self.ln_1, self.ln_2 = LayerNorm(e, m.use_bias), LayerNorm(e, m.use_bias)
        self.c_attn = nn.Linear(e, 3 * e, bias=m.use_bias)
        self.attn_proj = nn.Linear(e, e, bias=m.use_bias)
        self.c_fc = nn.Linear(e, m.mlp_dim, bias=m.use_bias)
        self.mlp_proj = nn.Linear(m.mlp_dim, e, bias=m.use_bias)

    def attention(self, x):
        b, t, e = x.shape
        q, k, v = self.c_attn(x).split(e, dim=2)
        q, k, v = (y.view(b, t, self.heads, e // self.heads).transpose(1, 2) for y in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.attn_proj(y.transpose(1, 2).contiguous().view(b, t, e))

    def forward(self, x):
        x = x + self.attention(self.ln_1(x))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.wte = nn.Embedding(m.vocab_size, m.embed_dim)
        self.wpe = nn.Embedding(m.max_seq_len, m.embed_dim)
        self.blocks = nn.ModuleList(Block(m) for _ in range(m.num_layers))
        self.ln_f = LayerNorm(m.embed_dim, m.use_bias)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = m.init_std / math.sqrt(2 * m.num_layers) if "proj" in name else m.init_std
                nn.init.normal_(p, 0.0, std)
            elif "bias" in name:
                nn.init.zeros_(p)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)  # tied output projection


def torch_optimizer(model, opt):
    """nanoGPT's AdamW: weight decay on every >= 2-D parameter, none on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": opt.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=opt.learning_rate, betas=(opt.b1, opt.b2), eps=opt.eps)


def learning_rate(step: int, opt, num_steps: int) -> float:
    """meshlm's schedule (training/optimizer.py, cosine): linear warm-up from 0, cosine to the
    floor; step is 0-based, as meshlm's state.step."""
    if step < opt.warmup_steps:
        return opt.learning_rate * step / opt.warmup_steps
    progress = min((step - opt.warmup_steps) / max(num_steps - opt.warmup_steps, 1), 1.0)
    floor = opt.final_lr_fraction
    return opt.learning_rate * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def mean_loss(model, inputs, targets):
    """The mean next-token cross-entropy of `model` on one batch."""
    logits = model(inputs)
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def torch_step(model, optimizer, inputs, targets, lr, clip) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = mean_loss(model, inputs, targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()  # the host reads the loss every step, as meshlm's loop does


# --- step mode ----------------------------------------------------------------------------
