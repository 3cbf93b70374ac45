"""BERT sequence classification: a tiny BertConfig, a few training steps, then predictions."""

import torch
from _compat import DEVICE, checksum, report, seed
from _tiny_tokenizer import CORPUS, build
from transformers import BertConfig, BertForSequenceClassification

tokenizer = build(cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
texts = [f"[CLS] {t} [SEP]" for t in CORPUS]
batch = tokenizer(texts, padding=True, return_tensors="pt")
labels = torch.tensor([0, 1, 0, 1, 1, 0])

seed(0)
config = BertConfig(
    vocab_size=len(tokenizer),
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=32,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    num_labels=2,
    pad_token_id=tokenizer.pad_token_id,
)
model = BertForSequenceClassification(config).to(DEVICE)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
inputs = {k: v.to(DEVICE) for k, v in batch.items()}

losses = []
for _ in range(4):
    out = model(**inputs, labels=labels.to(DEVICE))
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    losses.append(out.loss.item())

model.eval()
with torch.no_grad():
    logits = model(**inputs).logits
report(
    {
        "device": str(logits.device),
        "losses": losses,
        "logits": logits.cpu().tolist(),
        "predictions": logits.argmax(-1).tolist(),
        "checksum": checksum(model),
    },
    rtol=1e-3,
    atol=1e-4,
)
