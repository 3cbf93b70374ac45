"""``pipeline("text-generation")`` on the GPU with a tokenizer built locally."""

from _compat import DEVICE, report, seed
from _tiny_tokenizer import build
from transformers import GPT2Config, GPT2LMHeadModel, pipeline

tokenizer = build(bos_token="[BOS]", eos_token="[EOS]")
seed(0)
config = GPT2Config(
    vocab_size=len(tokenizer),
    n_positions=32,
    n_embd=32,
    n_layer=2,
    n_head=4,
    bos_token_id=tokenizer.bos_token_id,
    eos_token_id=tokenizer.eos_token_id,
    pad_token_id=tokenizer.pad_token_id,
)
model = GPT2LMHeadModel(config).eval()  # as from_pretrained returns it: no dropout
generator = pipeline(
    "text-generation", model=model, tokenizer=tokenizer, device=0 if DEVICE == "cuda" else -1
)
out = generator(["the cat sat", "a brown dog"], max_new_tokens=6, do_sample=False)

report(
    {
        "device": str(generator.model.device),
        "texts": [o[0]["generated_text"] for o in out],
    }
)
assert generator.device.type == DEVICE
