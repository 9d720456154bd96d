"""Generation-based evaluation: images with and without adapters, and what is measured on them.

* :mod:`.generation` — adapters applied to a pipeline's transformer, images from prompts and seeds;
* :mod:`.evaluate` — the evaluation run (``trainer evaluate``): prompt sets × seeds × variants;
* :mod:`.metrics` — PSNR, SSIM and the results tables (``results.csv``/``results.json``/``report.md``);
* :mod:`.scorers` — the table of image scorers (``--scorer``), :mod:`.clipscore` — CLIP score.
"""
