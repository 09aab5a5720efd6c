"""medvl's presets, shipped inside the wheel as the package ``medvl.configs``.

``<stage>/<preset>.yaml`` (stage: adamatch, report, autoencoder, diffusion; preset: tiny for tests, demo for CPU
runs, base for paper scale on GPUs) and ``demo_quick.yaml`` (the shorter schedules of ``medvl demo --preset quick``).
Look them up with :func:`medvl.config.resolve_config_path` and :func:`medvl.config.preset_file`, never by a path
relative to a checkout.
"""
