"""Shared infrastructure of the trainer: nothing here knows a model family, a command or a stage.

* :mod:`.errors` — the one-line errors (exit code 2 for bad input, 1 at run time);
* :mod:`.config` — the run configuration (dataclasses with declared rules, TOML, fingerprints);
* :mod:`.prompts`, :mod:`.images` — prompt files and image-caption folders, checked before a run writes;
* :mod:`.rundir` — the run directory's layout and atomic writes, checkpoint manifests, safetensors headers;
* :mod:`.runtime` — device, mixed precision and data parallelism;
* :mod:`.progress` — progress bars; :mod:`.comfyui_copy` — putting an adapter into a ComfyUI folder.
"""
