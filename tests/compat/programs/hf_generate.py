"""``generate``: greedy, beam search and sampling from a tiny random GPT-2."""

import torch
from _compat import DEVICE, report, seed
from transformers import GPT2Config, GPT2LMHeadModel

seed(0)
config = GPT2Config(
    vocab_size=50, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2
)
model = GPT2LMHeadModel(config).to(DEVICE).eval()
prompt = torch.randint(1, 50, (2, 5)).to(DEVICE)
mask = torch.ones_like(prompt)
common = dict(attention_mask=mask, max_new_tokens=8, pad_token_id=0)

greedy = model.generate(prompt, do_sample=False, **common)
beam = model.generate(prompt, num_beams=3, do_sample=False, **common)
torch.manual_seed(1)  # sampling draws from the device's generator, as on any GPU
sampled = model.generate(prompt, do_sample=True, top_k=10, temperature=0.8, **common)

report(
    {
        "device": str(greedy.device),
        "greedy": greedy.tolist(),
        "beam": beam.tolist(),
        "sampled": sampled.tolist(),
        "sampled_in_vocab": bool(((sampled >= 0) & (sampled < 50)).all()),
    },
    unchecked=["sampled"],
)
