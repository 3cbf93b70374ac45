"""T5 (encoder-decoder with a learned relative position bias): a few seq2seq training steps.

Its backward once failed on the remote GPU in ``WhereBackward0`` ("size of tensor a (8)
must match the size of tensor b (0)"): the position bias's gradient came back empty."""

import torch
from _compat import DEVICE, checksum, report, seed
from transformers import T5Config, T5ForConditionalGeneration

seed(0)
config = T5Config(
    vocab_size=64,
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=4,
    dropout_rate=0.0,
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
)
model = T5ForConditionalGeneration(config).to(DEVICE)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
input_ids = torch.randint(2, 64, (3, 8))
labels = torch.randint(2, 64, (3, 6))
labels[0, 4:] = -100  # a padded target, as DataCollatorForSeq2Seq makes them

losses = []
for _ in range(3):
    out = model(input_ids=input_ids.to(DEVICE), labels=labels.to(DEVICE))
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    losses.append(out.loss.item())
bias = model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight

report(
    {
        "device": str(bias.device),
        "losses": losses,
        "position_bias_sum": float(bias.detach().double().sum().cpu()),
        "checksum": checksum(model),
    },
    rtol=1e-3,
    atol=1e-4,
)
