"""`DuoDiffPipeline`: a small diffusers-style entry (shallow transformer, deep transformer, scheduler,
optional VAE, switch) returning PIL images, arrays or latents.

    from diffusers import DPMSolverMultistepScheduler
    from duodiff_fast.pipeline import DuoDiffPipeline

    pipe = DuoDiffPipeline.from_local(deep="DiT-XL-2-256/transformer",            # a diffusers folder
                                      shallow="runs/shallow/ema.safetensors", shallow_preset="dit_xl_2_shallow",
                                      scheduler=DPMSolverMultistepScheduler(beta_schedule="linear"),
                                      vae="DiT-XL-2-256/vae", switch=0.4, device="cuda")
    images = pipe(class_labels=[207, 360], num_inference_steps=25, guidance_scale=4.0,
                  generator=torch.Generator("cuda").manual_seed(0)).images      # list of PIL images

`scheduler` is a diffusers scheduler instance (eager loop, `sampling.diffusers_loop`) or the name of one
of the library's own solvers ('ddim', 'ddpm', 'dpmsolver++', through `DuoSampler`). Nothing is
downloaded: every path is a local file or folder.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["DuoDiffPipeline", "DuoDiffPipelineOutput"]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class DuoDiffPipelineOutput:
    """`images`: list of PIL images ('pil'), float32 [N, H, W, C] in [0, 1] ('np'), float32 [N, C, H, W] in
    [0, 1] ('pt'), or the model-space samples ('latent'); `trace`: which model ran each evaluation."""
    images: object
    trace: object = None


def _load(path, preset, map_location):
    from .models import load_checkpoint
    from .models.diffusers_io import find_model_folder, load_diffusers_dit
    if find_model_folder(path) is not None:
        return load_diffusers_dit(find_model_folder(path), preset, map_location=map_location)
    if preset is None:
        raise ValueError(f"{path} is a checkpoint file: pass its preset (deep_preset= / shallow_preset=); only "
                         "diffusers folders describe their own architecture")
    return load_checkpoint(path, preset, map_location=map_location)


class DuoDiffPipeline:
    """Shallow model for the first `switch` of the solver steps, deep model for the rest, then the VAE.

    Args:
        shallow, deep: our models (`duodiff_fast.models` DiT / U-ViT); `DuoDiffPipeline(deep, deep, ...)`
            samples with the deep model only.
        scheduler: a diffusers scheduler instance, or 'ddim' | 'ddpm' | 'dpmsolver++'.
        vae: None, a local AutoencoderKL folder, or an AutoencoderKL; needed for images from latent models.
        switch: fraction of the solver steps on the shallow model, or `AtTimestep(t)`.
        schedule: the models' training schedule (default: the deep model's `schedule_spec`).
        latent_scale: VAE latent scale (default: the deep model's preset value, else 0.18215).
        guide_channels: how many leading eps channels guidance applies to; 'auto' (default): the deep
            model's `cfg_channels` (None = all latent channels: models loaded from diffusers folders, as
            DiTPipeline; 3 for DiT presets, as the original forward_with_cfg).
    """

    def __init__(self, shallow, deep, scheduler="ddim", vae=None, *, switch=0.3, schedule=None,
                 latent_scale=None, guide_channels="auto"):
        from .models.configs import LATENT_SCALE, PRESETS
        from .sampling.diffusers_loop import is_scheduler
        if not (isinstance(scheduler, str) or is_scheduler(scheduler)):
            raise TypeError(f"scheduler must be 'ddim', 'ddpm', 'dpmsolver++' or a diffusers scheduler instance, "
                            f"got {type(scheduler).__name__}")
        self.shallow, self.deep, self.scheduler = shallow.eval(), deep.eval(), scheduler
        self.switch = switch
        self.schedule = schedule if schedule is not None else getattr(deep, "schedule_spec", None)
        if self.schedule is None:
            raise ValueError("DuoDiffPipeline: pass schedule= (the deep model carries no schedule_spec)")
        if latent_scale is None:
            preset = PRESETS.get(getattr(deep, "preset", None) or "", {})
            latent_scale = preset.get("latent_scale", LATENT_SCALE)
        self.latent_scale = float(latent_scale)
        if isinstance(guide_channels, str) and guide_channels == "auto":
            guide_channels = getattr(deep, "cfg_channels", None)
        self.guide_channels = guide_channels
        if isinstance(vae, (str, bytes)) or hasattr(vae, "__fspath__"):
            from .vae import load_vae
            p = next(deep.parameters())
            vae = load_vae(vae, device=p.device)
        self.vae = vae

    @classmethod
    def from_local(cls, deep, shallow=None, *, deep_preset=None, shallow_preset=None, scheduler="ddim", vae=None,
                   switch=0.3, device=None, dtype=None, **kwargs):
        """Build from local paths: `deep`/`shallow` are diffusers DiT folders (architecture from their
        config) or checkpoint files (with their presets); `shallow=None` samples with the deep model only."""
        deep_m = _load(deep, deep_preset, "cpu")
        shallow_m = deep_m if shallow is None else _load(shallow, shallow_preset, "cpu")
        pipe_models = [deep_m] if shallow_m is deep_m else [deep_m, shallow_m]
        for m in pipe_models:
            m.to(device=device, dtype=dtype)
        return cls(shallow_m, deep_m, scheduler, vae, switch=switch, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.deep.parameters()).device

    def to(self, device=None, dtype=None):
        """Move the transformers (and the VAE, kept in float32) to `device`; cast the transformers to `dtype`."""
        self.deep.to(device=device, dtype=dtype)
        self.shallow.to(device=device, dtype=dtype)
        if self.vae is not None and device is not None:
            self.vae.to(device=device)
        return self

    def _labels(self, class_labels, num_images):
        """(n, labels or None): labels given (checked), or None to be drawn after the noise, as DuoSampler
        draws them."""
        num_classes = self.num_classes
        if num_classes <= 0:
            if class_labels is not None:
                raise ValueError("class_labels given, but the models are unconditional")
            if num_images is None or int(num_images) < 1:
                raise ValueError(f"num_images must be >= 1 for an unconditional model, got {num_images!r}")
            return int(num_images), None
        if class_labels is None:
            if num_images is None or int(num_images) < 1:
                raise ValueError("give class_labels, or num_images >= 1 to draw labels at random")
            return int(num_images), None
        y = torch.as_tensor(class_labels).reshape(-1)
        if y.is_floating_point() or y.dtype == torch.bool or y.numel() == 0:
            raise ValueError(f"class_labels must be a non-empty list of integer labels, got {class_labels!r}")
        if num_images is not None and int(num_images) != y.numel():
            raise ValueError(f"num_images={num_images} but {y.numel()} class_labels were given")
        limit = self.label_range()
        if int(y.min()) < 0 or int(y.max()) >= limit:
            raise ValueError(f"class_labels must lie in [0, {limit}), got min {int(y.min())} max {int(y.max())}")
        return y.numel(), y.to(self.device, torch.long)

    def label_range(self) -> int:
        """Real labels are [0, label_range): U-ViT's ImageNet models reserve their last class as the null one."""
        null = getattr(self.deep, "null_class", None)
        return null if null is not None and null < self.num_classes else self.num_classes

    @property
    def num_classes(self):
        return getattr(self.deep, "num_classes", 0) or 0

    def __call__(self, class_labels=None, *, num_images=None, num_inference_steps=50, guidance_scale=None,
                 switch=None, generator=None, output_type="pil", decode_batch_size=8, progress=False,
                 shallow_guidance_scale=None):
        """Sample. `guidance_scale` is diffusers' (`uncond + w (cond - uncond)`; None or 1 = off);
        `shallow_guidance_scale` the scale of the shallow steps (None = `guidance_scale`); `switch`
        overrides the pipeline's for this call. Returns DuoDiffPipelineOutput."""
        with torch.inference_mode():
            out = self._call(class_labels, num_images, num_inference_steps, guidance_scale, switch, generator,
                             output_type, decode_batch_size, progress, shallow_guidance_scale)
        if isinstance(out.images, torch.Tensor):
            out.images = out.images.clone()  # outside inference mode: an ordinary tensor
        return out

    def _call(self, class_labels, num_images, num_inference_steps, guidance_scale, switch, generator,
              output_type, decode_batch_size, progress, shallow_guidance_scale=None):
        from .sampling import DuoSampler, SampleTrace
        from .sampling.diffusers_loop import make_model_fn, run_scheduler_loop
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        switch = self.switch if switch is None else switch
        n, y = self._labels(class_labels, num_images)
        latent_model = bool(getattr(self.deep, "in_channels", 3) not in (1, 3))
        if latent_model and output_type != "latent" and self.vae is None:
            raise ValueError("this is a latent model: images need a VAE (vae=<AutoencoderKL folder>), or use "
                             "output_type='latent'")
        if isinstance(self.scheduler, str):
            sampler = DuoSampler(self.shallow, self.deep, schedule=self.schedule, solver=self.scheduler,
                                 steps=num_inference_steps, switch=switch, cfg_scale=guidance_scale,
                                 shallow_cfg_scale=shallow_guidance_scale, cfg_channels=self.guide_channels,
                                 progress=progress)
            x = sampler.sample(n=n, y=y, generator=generator)
            trace = sampler.trace
        else:
            deep = self.deep
            shape = (n, deep.in_channels, deep.img_size, deep.img_size)
            gdev = generator.device if generator is not None else self.device
            noise = torch.randn(shape, generator=generator, device=gdev, dtype=torch.float32).to(self.device)
            if y is None and self.num_classes > 0:  # drawn after the noise, as DuoSampler does
                y = torch.randint(0, self.label_range(), (n,), generator=generator, device=gdev).to(self.device)
            fn = make_model_fn(self.shallow, deep, schedule=self.schedule, y=y, cfg_scale=guidance_scale,
                               shallow_cfg_scale=shallow_guidance_scale, guide_channels=self.guide_channels)
            trace = SampleTrace()
            x = run_scheduler_loop(self.scheduler, num_inference_steps, switch, fn, noise, generator,
                                   schedule=self.schedule, learned_sigma=getattr(deep, "learn_sigma", False),
                                   trace=trace, progress=progress)
        if output_type == "latent":
            return DuoDiffPipelineOutput(images=x, trace=trace)
        if latent_model:
            from .vae import decode_latents
            u8 = decode_latents(self.vae, x, latent_scale=self.latent_scale, batch_size=decode_batch_size,
                                device=self.device)
        else:
            from .data import to_uint8
            u8 = to_uint8(x)
        if output_type == "pil":
            from PIL import Image
            images = [Image.fromarray(im[:, :, 0] if im.shape[2] == 1 else im) for im in u8]
        else:
            arr = u8.astype(np.float32) / 255.0
            images = arr if output_type == "np" else torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
        return DuoDiffPipelineOutput(images=images, trace=trace)
