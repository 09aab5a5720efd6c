"""The report-to-X-ray diffusion head: MONAI latent diffusion guided by report words, memory and keypatches.

Only glue lives here; the networks, noise schedules and DDIM / PLMS samplers are MONAI's. By job:

* :mod:`~medvl.models.diffusion.autoencoder` - ``AutoencoderKL`` (image (B, 1, S, S) in [-1, 1] <-> latent
  (B, C, S/f, S/f)) and :class:`AutoencoderBundle`, the ``autoencoder/`` component with its latent scale factor
  (computed from training data by the autoencoder stage);
* :mod:`~medvl.models.diffusion.layout` - the side / layout hint maps read from a report;
* :mod:`~medvl.models.diffusion.conditioning` - :class:`ReportEncoder` (the frozen AdaMatch text side: report ->
  :class:`ReportFeatures`) and :class:`ReportConditioner` (features -> the cross-attention context, with a learned
  null context for condition dropout and classifier-free guidance);
* :mod:`~medvl.models.diffusion.denoiser` - :class:`Denoiser` (``DiffusionModelUNet`` + the conditioner),
  :class:`LatentDiffusion` (v-prediction training module with an EMA copy) and :class:`DiffusionBundle`, the
  ``diffusion/`` component (denoiser weights + ``scheduler_config.json``);
* :mod:`~medvl.models.diffusion.samplers` - noise schedules, DDIM / PLMS / DPM-Solver++(2M), consistency
  sampling for distilled students, classifier-free guidance, the scheduler config read back at sampling.
"""

from medvl.models.diffusion.autoencoder import (
    XRAY_RANGE,
    AutoencoderBundle,
    AutoencoderConfig,
    LatentInfo,
    build_autoencoder,
    from_model_range,
    to_model_range,
)
from medvl.models.diffusion.conditioning import (
    ConditionConfig,
    ReportConditioner,
    ReportEncoder,
    ReportFeatures,
)
from medvl.models.diffusion.denoiser import Denoiser, DiffusionBundle, LatentDiffusion, UNetConfig
from medvl.models.diffusion.layout import (
    DEFAULT_LAYOUT_PRIOR,
    layout_prior_from_regions,
    report_layout,
    report_sides,
)
from medvl.models.diffusion.samplers import (
    ConsistencyScheduler,
    DPMSolverMultistepScheduler,
    NoiseScheduleConfig,
    Precision,
    SamplerConfig,
    SamplerName,
    autocast_context,
    build_sampler,
    build_train_scheduler,
    clean_estimate,
    consistency_boundary,
    consistency_grid,
    guided_velocity,
    initial_noise,
    load_distillation,
    load_scheduler_config,
    sample_latents,
    save_scheduler_config,
)

__all__ = [
    "XRAY_RANGE",
    "AutoencoderBundle",
    "AutoencoderConfig",
    "LatentInfo",
    "build_autoencoder",
    "from_model_range",
    "to_model_range",
    "ConditionConfig",
    "ReportConditioner",
    "ReportEncoder",
    "ReportFeatures",
    "Denoiser",
    "DiffusionBundle",
    "LatentDiffusion",
    "UNetConfig",
    "DEFAULT_LAYOUT_PRIOR",
    "layout_prior_from_regions",
    "report_layout",
    "report_sides",
    "ConsistencyScheduler",
    "DPMSolverMultistepScheduler",
    "NoiseScheduleConfig",
    "Precision",
    "SamplerConfig",
    "SamplerName",
    "autocast_context",
    "build_sampler",
    "build_train_scheduler",
    "clean_estimate",
    "consistency_boundary",
    "consistency_grid",
    "guided_velocity",
    "initial_noise",
    "load_distillation",
    "load_scheduler_config",
    "sample_latents",
    "save_scheduler_config",
]
