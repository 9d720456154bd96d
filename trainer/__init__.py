"""SafeRoPE trainer: an offline CLI that turns prompt lists and a FLUX model into adapter files.

Run ``python -m trainer --help``. Depends on ``saferope_engine`` (never the other way round).
"""
