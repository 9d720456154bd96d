"""The nodes' definitions and the loader node, without ComfyUI (``folder_paths`` faked where needed)."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "comfy"))
from packload import REPO, load_pack  # noqa: E402

PACK = load_pack()
from saferope_pack.nodes import folders  # noqa: E402
from saferope_pack.saferope_engine import AdapterMeta, BlockAdapter, SafeRoPEAdapter  # noqa: E402
from saferope_pack.saferope_engine.errors import AdapterFormatError  # noqa: E402

IDS = {"SafeRoPEAdapterLoader": "Load SafeRoPE Adapter", "SafeRoPEApply": "Apply SafeRoPE to Model",
       "SafeRoPELRSVisualizer": "LRS Visualizer", "SafeRoPERiskCheck": "SafeRoPE Risk Check",
       # the shipped toy model's nodes (nodes/toy.py), category SafeRoPE/toy
       "SafeRoPEToyLoader": "Load Toy Model (SafeRoPE toy)", "SafeRoPEToyTextEncode": "Toy Text Encode (SafeRoPE toy)",
       "SafeRoPEToyVAEDecode": "Toy VAE Decode (SafeRoPE toy)", "SafeRoPEToyEmptyLatent": "Empty Toy Latent (SafeRoPE toy)"}


def test_node_ids_and_display_names_are_the_permanent_ones():
    assert dict(PACK.NODE_DISPLAY_NAME_MAPPINGS) == IDS
    assert set(PACK.NODE_CLASS_MAPPINGS) == set(IDS)
    for node, cls in PACK.NODE_CLASS_MAPPINGS.items():
        category = "SafeRoPE/toy" if node.startswith("SafeRoPEToy") else "SafeRoPE"
        assert cls.CATEGORY == category and callable(getattr(cls, cls.FUNCTION)) and cls.DESCRIPTION


def test_root_package_imports_without_comfyui_as_a_directory_package():
    code = ("import importlib, sys; m = importlib.import_module(sys.argv[1]); "
            "assert 'folder_paths' not in sys.modules and 'comfy' not in sys.modules; "
            "print(sorted(m.NODE_CLASS_MAPPINGS))")
    out = subprocess.run([sys.executable, "-c", code, REPO.name], cwd=str(REPO.parent), capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(sorted(IDS))


def _specs(cls) -> dict:
    it = cls.INPUT_TYPES()
    return {**it.get("required", {}), **it.get("optional", {})}


@pytest.mark.parametrize("node", sorted(IDS))
def test_every_input_and_output_has_a_tooltip(node):
    cls = PACK.NODE_CLASS_MAPPINGS[node]
    for name, spec in _specs(cls).items():
        assert len(spec) == 2 and spec[1].get("tooltip"), f"{node}.{name} has no tooltip"
    assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)


def test_apply_inputs():
    s = _specs(PACK.NODE_CLASS_MAPPINGS["SafeRoPEApply"])
    assert list(s) == ["model", "adapter", "strength", "threshold", "start_percent", "end_percent"]
    assert s["model"][0] == "MODEL" and s["adapter"][0] == "SAFEROPE_ADAPTER"
    assert s["strength"][0] == "FLOAT" and s["strength"][1]["default"] == 1.0 and s["strength"][1]["min"] == 0.0
    assert s["threshold"][1]["default"] == -1.0 and s["threshold"][1]["min"] == -1.0 and s["threshold"][1]["max"] < 1.0
    assert (s["start_percent"][1]["default"], s["end_percent"][1]["default"]) == (0.0, 1.0)
    assert PACK.NODE_CLASS_MAPPINGS["SafeRoPEApply"].RETURN_TYPES == ("MODEL",)


def test_visualizer_inputs_and_outputs():
    cls = PACK.NODE_CLASS_MAPPINGS["SafeRoPELRSVisualizer"]
    it = cls.INPUT_TYPES()
    assert list(it["required"]) == ["model", "conditioning", "width", "height", "noise_level", "seed"]
    assert {k: v[0] for k, v in it["optional"].items()} == {"clip": "CLIP", "prompt": "STRING"}
    assert it["required"]["seed"][1]["control_after_generate"] is True
    assert it["required"]["width"][1]["step"] == 16 and 0.0 <= it["required"]["noise_level"][1]["max"] < 1.0
    assert cls.RETURN_TYPES == ("IMAGE", "STRING", "FLOAT", "BOOLEAN")  # appended outputs: old links keep their slots
    assert cls.RETURN_NAMES == ("image", "summary", "max_risk", "flagged")


def test_risk_check_takes_the_visualizer_inputs_and_returns_values_to_branch_on():
    check, vis = PACK.NODE_CLASS_MAPPINGS["SafeRoPERiskCheck"], PACK.NODE_CLASS_MAPPINGS["SafeRoPELRSVisualizer"]
    assert check.INPUT_TYPES()["required"] == vis.INPUT_TYPES()["required"] and "optional" not in check.INPUT_TYPES()
    assert check.RETURN_TYPES == ("FLOAT", "BOOLEAN", "STRING") and check.RETURN_NAMES == ("max_risk", "flagged", "summary")


# -- the loader node with a stand-in for ComfyUI's folder_paths --------------------------------------------
@pytest.fixture
def fake_folder_paths(tmp_path, monkeypatch):
    """Just enough of ComfyUI's ``folder_paths`` (its public functions' behaviour) for the loader."""
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(tmp_path / "models")
    fp.folder_names_and_paths = {}

    def add_model_folder_path(name, path, is_default=False):
        if name not in fp.folder_names_and_paths:
            fp.folder_names_and_paths[name] = ([path], set())
        else:
            paths = fp.folder_names_and_paths[name][0]
            if path not in paths:
                paths.insert(0, path) if is_default else paths.append(path)

    def get_filename_list(name):
        paths, exts = fp.folder_names_and_paths[name]
        return sorted(f for p in paths if os.path.isdir(p) for f in os.listdir(p)
                      if not exts or os.path.splitext(f)[1] in exts)

    def get_full_path(name, filename):
        for p in fp.folder_names_and_paths[name][0]:
            if os.path.isfile(os.path.join(p, filename)):
                return os.path.join(p, filename)
        return None

    fp.add_model_folder_path, fp.get_filename_list, fp.get_full_path = add_model_folder_path, get_filename_list, get_full_path
    fp.get_folder_paths = lambda name: list(fp.folder_names_and_paths[name][0])
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    return fp


def small_adapter() -> SafeRoPEAdapter:
    U = torch.linalg.qr(torch.randn(1, 8, 2, dtype=torch.float64))[0].float()
    A = torch.tensor([[[0.0, -1.0], [1.0, 0.0]]])
    meta = AdapterMeta(num_heads=2, head_dim=8, blocks={"double": 1, "single": 1}, rank=2, threshold=0.5)
    return SafeRoPEAdapter(meta, [BlockAdapter("double", 0, torch.tensor([1]), U, U.clone(), A)])


def test_model_folder_keeps_extra_paths_puts_the_default_first_and_lists_only_safetensors(fake_folder_paths, tmp_path):
    extra = tmp_path / "extra"
    extra.mkdir()
    fake_folder_paths.add_model_folder_path("saferope", str(extra))  # as extra_model_paths.yaml does, before us
    assert folders.register()
    paths, exts = fake_folder_paths.folder_names_and_paths["saferope"]
    assert paths == [os.path.join(fake_folder_paths.models_dir, "saferope"), str(extra)] and exts == {".safetensors"}
    small_adapter().save(extra / "a.safetensors")
    (extra / "b.ckpt").write_bytes(b"x")
    assert PACK.NODE_CLASS_MAPPINGS["SafeRoPEAdapterLoader"].INPUT_TYPES()["required"]["adapter_name"][0] == ["a.safetensors"]


def test_loader_loads_and_names_the_file_of_a_bad_adapter(fake_folder_paths, tmp_path):
    folders.register()
    d = Path(fake_folder_paths.models_dir) / "saferope"
    d.mkdir(parents=True)
    small_adapter().save(d / "good.safetensors")
    (d / "bad.safetensors").write_bytes(b"not a safetensors file at all")
    loader = PACK.NODE_CLASS_MAPPINGS["SafeRoPEAdapterLoader"]()
    (adapter,) = loader.load("good.safetensors")
    assert isinstance(adapter, SafeRoPEAdapter) and adapter.source == str(d / "good.safetensors")
    with pytest.raises(AdapterFormatError, match="bad.safetensors"):
        loader.load("bad.safetensors")
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):
        loader.load("gone.safetensors")


def test_a_broken_symlink_or_a_folder_is_named_for_what_it_is(fake_folder_paths, tmp_path):
    folders.register()
    d = Path(fake_folder_paths.models_dir) / "saferope"
    d.mkdir(parents=True)
    (d / "dangling.safetensors").symlink_to(tmp_path / "moved" / "adapter.safetensors")
    (d / "dir.safetensors").mkdir()
    loader = PACK.NODE_CLASS_MAPPINGS["SafeRoPEAdapterLoader"]()
    assert "dangling.safetensors" in folders.adapter_names()  # listed, as ComfyUI lists it
    with pytest.raises(FileNotFoundError) as e:
        loader.load("dangling.safetensors")
    msg = str(e.value)
    assert "is a broken symbolic link pointing to" in msg and str(tmp_path / "moved" / "adapter.safetensors") in msg
    with pytest.raises(FileNotFoundError, match="dir.safetensors is not a regular file"):
        loader.load("dir.safetensors")
    with pytest.raises(FileNotFoundError, match="'gone.safetensors' not found in"):
        loader.load("gone.safetensors")


def test_loader_reloads_when_the_file_changes(fake_folder_paths):
    folders.register()
    d = Path(fake_folder_paths.models_dir) / "saferope"
    d.mkdir(parents=True)
    cls = PACK.NODE_CLASS_MAPPINGS["SafeRoPEAdapterLoader"]
    small_adapter().save(d / "a.safetensors")
    first = cls.IS_CHANGED("a.safetensors")
    os.utime(d / "a.safetensors", ns=(1, 1))
    assert cls.IS_CHANGED("a.safetensors") != first
    assert cls.IS_CHANGED("gone.safetensors") == "missing:gone.safetensors"


def test_adapter_loaded_under_inference_mode_still_works(fake_folder_paths):
    """ComfyUI runs nodes in torch.inference_mode(); the engine's caches need version counters."""
    folders.register()
    d = Path(fake_folder_paths.models_dir) / "saferope"
    d.mkdir(parents=True)
    small_adapter().save(d / "a.safetensors")
    with torch.inference_mode():
        (adapter,) = PACK.NODE_CLASS_MAPPINGS["SafeRoPEAdapterLoader"]().load("a.safetensors")
        q = torch.randn(1, 2, 5, 8)
        q2, _ = adapter.apply_qk("double", 0, q, q, txt_len=5, threshold=0.0)
    assert q2.shape == q.shape and not torch.equal(q2, q)


def test_packaging_metadata_for_comfyui():
    import tomllib

    comfy = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert comfy["Icon"].endswith("/main/docs/saferope-icon.png") and (REPO / "docs" / "saferope-icon.png").is_file()
    assert all((REPO / d).is_dir() for d in comfy["includes"])
    reqs = [line for line in (REPO / "requirements.txt").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert reqs == []  # torch, safetensors, numpy and Pillow come with ComfyUI
