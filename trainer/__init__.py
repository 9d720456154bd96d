"""SafeRoPE trainer: an offline CLI that turns prompt lists and a diffusers model of any supported family
(FLUX.1, Flux.2, Chroma, HunyuanImage 2.1, Qwen-Image, Z-Image) into adapter files.

Run ``python -m trainer --help``. Depends on ``saferope_engine`` (never the other way round).
"""
