"""diffusers: a tiny ``UNet2DModel`` trained one DDPM step, then two denoising steps."""

import torch
from _compat import DEVICE, checksum, report, seed
from diffusers import DDPMScheduler, UNet2DModel

seed(0)
unet = UNet2DModel(
    sample_size=16,
    in_channels=3,
    out_channels=3,
    layers_per_block=1,
    block_out_channels=(16, 32),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
).to(DEVICE)
scheduler = DDPMScheduler(num_train_timesteps=50)
optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)

images = torch.randn(2, 3, 16, 16)
noise = torch.randn(2, 3, 16, 16)
timesteps = torch.tensor([3, 40])
noisy = scheduler.add_noise(images, noise, timesteps)
pred = unet(noisy.to(DEVICE), timesteps.to(DEVICE)).sample
loss = torch.nn.functional.mse_loss(pred, noise.to(DEVICE))
loss.backward()
optimizer.step()

# Sampling noise from a CPU generator, as diffusers' own reproducibility docs advise.
generator = torch.Generator("cpu").manual_seed(0)
scheduler.set_timesteps(10)
sample = torch.randn(1, 3, 16, 16, generator=generator).to(DEVICE)
unet.eval()
with torch.no_grad():
    for t in scheduler.timesteps[:2]:
        eps = unet(sample, t).sample
        sample = scheduler.step(eps, t, sample, generator=generator).prev_sample

report(
    {
        "device": str(sample.device),
        "loss": loss.item(),
        "sample_mean": sample.mean().item(),
        "sample_abs": sample.abs().sum().item(),
        "checksum": checksum(unet),
    },
    rtol=1e-3,
    atol=1e-4,
)
