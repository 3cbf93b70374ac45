"""A small GPT-2 language model trained for a few AdamW steps (tied input/output embeddings)."""

import torch
from _compat import DEVICE, checksum, report, seed
from _tiny_tokenizer import CORPUS, build
from transformers import GPT2Config, GPT2LMHeadModel

tokenizer = build(bos_token="[BOS]", eos_token="[EOS]")
batch = tokenizer(CORPUS, padding=True, return_tensors="pt")
labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

seed(0)
config = GPT2Config(
    vocab_size=len(tokenizer),
    n_positions=32,
    n_embd=32,
    n_layer=2,
    n_head=4,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    pad_token_id=tokenizer.pad_token_id,
    bos_token_id=tokenizer.bos_token_id,
    eos_token_id=tokenizer.eos_token_id,
)
model = GPT2LMHeadModel(config).to(DEVICE)
assert model.lm_head.weight is model.transformer.wte.weight, "tied weights came apart"
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)

model.train()
losses = []
for _step in range(5):
    out = model(
        input_ids=batch["input_ids"].to(DEVICE),
        attention_mask=batch["attention_mask"].to(DEVICE),
        labels=labels.to(DEVICE),
    )
    optimizer.zero_grad()
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    losses.append(out.loss.item())

report(
    {
        "device": str(model.lm_head.weight.device),
        "still_tied": model.lm_head.weight is model.transformer.wte.weight,
        "losses": losses,
        "logits_shape": list(out.logits.shape),
        "checksum": checksum(model),
    },
    rtol=1e-3,
    atol=1e-4,
)
