"""Reference SyncDiffusion, written the straightforward way, to check the plugin against.

One window at a time, exactly as the method reads (Lee et al., NeurIPS 2023; ControlSync
Eq. 3–4) and as the authors' sampling loop does it: the anchor's foreseen image is decoded
first (no gradient); then for each window, if the step is synchronized and the window is not
the anchor, a guided UNet call with gradient, DDIM's ``pred_original_sample``, the VAE decode
to [0, 1], LPIPS on the images rescaled to [-1, 1], the gradient with respect to the window
latent and the descent step; then the window's own guided denoising step, and MultiDiffusion's
average over windows (uniform weights).

It shares nothing with the plugin or the engine's loop beyond the pipeline's modules, the
geometry's ``extract``/``insert`` and the LPIPS module; the initial noise is drawn as the
engine draws it, so both start from the same canvas.
"""

from __future__ import annotations

import copy

import torch


def sync_diffusion_oracle(
    pipeline,
    geometry,
    *,
    prompt: str,
    guidance_scale: float,
    num_inference_steps: int,
    seed: int,
    w: float,
    decay: float,
    lpips_module,
    every: int = 1,
    until_step: int | None = None,
    anchor: int | None = None,
    taesd=None,
) -> torch.Tensor:
    """Final canvas latents ``(S, 4, H, W)`` of a synchronized joint diffusion (DDIM, eta 0).

    ``taesd``: an ``AutoencoderTiny`` decoding the loss images instead of the VAE (fast mode).
    """
    geometry.setup(pipeline.vae_scale_factor)
    count = geometry.num_windows
    anchor = count // 2 if anchor is None else anchor
    with torch.no_grad():
        cond, uncond = pipeline.encode_prompt(prompt, "cpu", 1, True, negative_prompt="")
    text = torch.cat([uncond, cond])
    scheduler = copy.deepcopy(pipeline.scheduler)
    scheduler.set_timesteps(num_inference_steps, device="cpu")

    def guided_noise(x, t):
        # The model may run in another dtype; latents stay float32, as in the engine.
        noise = pipeline.unet(torch.cat([x, x]).to(text.dtype), t, encoder_hidden_states=text).sample.float()
        uncond_noise, cond_noise = noise.chunk(2)
        return uncond_noise + guidance_scale * (cond_noise - uncond_noise)

    def foreseen_image(x, t):
        x0 = scheduler.step(guided_noise(x, t), t, x).pred_original_sample
        if taesd is not None:
            image = taesd.decode(x0.to(taesd.dtype)).sample
        else:
            vae = pipeline.vae
            image = vae.decode(x0.to(vae.dtype) / vae.config.scaling_factor).sample
        return (image / 2 + 0.5).clamp(0, 1)

    sheets, height, width = geometry.canvas_shape_latent
    generator = torch.Generator("cpu").manual_seed(seed)
    latent = torch.randn((sheets, 4, height, width), generator=generator) * scheduler.init_noise_sigma
    ones = torch.ones(1, 1, *geometry.window_size_latent)

    for i, t in enumerate(scheduler.timesteps):
        synchronized = (i + 1) % every == 0 and (until_step is None or i < until_step)
        if synchronized:
            with torch.no_grad():
                anchor_image = foreseen_image(geometry.extract(latent, [anchor]), t)
        value = torch.zeros_like(latent)
        weight = torch.zeros(sheets, 1, height, width)
        for k in range(count):
            x = geometry.extract(latent, [k])
            if synchronized and k != anchor:
                with torch.enable_grad():
                    x_grad = x.clone().requires_grad_(True)
                    image = foreseen_image(x_grad, t)
                    loss = lpips_module(image * 2.0 - 1.0, anchor_image * 2.0 - 1.0)
                    grad = torch.autograd.grad(loss.sum(), x_grad)[0]
                x = x - (w * decay**i) * grad
            with torch.no_grad():
                previous = scheduler.step(guided_noise(x, t), t, x, eta=0.0).prev_sample
            geometry.insert(value, previous, [k])
            geometry.insert(weight, ones, [k])
        latent = value / weight
    return latent
