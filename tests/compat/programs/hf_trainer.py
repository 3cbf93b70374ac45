"""``transformers.Trainer`` for a few steps on a tiny GPT-2, then ``evaluate``."""

import torch
from _compat import DEVICE, checksum, report, seed
from _tiny_tokenizer import CORPUS, build
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments


class LMDataset(torch.utils.data.Dataset):
    def __init__(self, tokenizer):
        enc = tokenizer(CORPUS * 2, padding="max_length", max_length=12, return_tensors="pt")
        self.ids, self.mask = enc["input_ids"], enc["attention_mask"]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i].masked_fill(self.mask[i] == 0, -100)
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": labels}


tokenizer = build(bos_token="[BOS]", eos_token="[EOS]")
seed(0)
config = GPT2Config(
    vocab_size=len(tokenizer),
    n_positions=16,
    n_embd=32,
    n_layer=2,
    n_head=4,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    bos_token_id=tokenizer.bos_token_id,
    eos_token_id=tokenizer.eos_token_id,
)
model = GPT2LMHeadModel(config)
args = TrainingArguments(
    output_dir="trainer-out",
    per_device_train_batch_size=4,
    max_steps=4,
    learning_rate=1e-3,
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    disable_tqdm=True,
    seed=0,
)
data = LMDataset(tokenizer)
trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
trainer.train()
metrics = trainer.evaluate()

report(
    {
        "device": str(next(model.parameters()).device),
        "args_device": args.device.type,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "eval_loss": metrics["eval_loss"],
        "checksum": checksum(model),
    },
    rtol=1e-3,
    atol=1e-4,
)
assert args.device.type == DEVICE
