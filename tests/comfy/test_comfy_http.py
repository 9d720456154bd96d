"""End to end through ComfyUI's HTTP API: a local server, ``POST /prompt`` with the three nodes.

The server runs ``main.py --cpu`` on 127.0.0.1 with a temporary base directory whose
``custom_nodes`` holds this repository (and the test-only tiny-FLUX/conditioning nodes), and an
``extra_model_paths.yaml`` that is the only place the adapters are found.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from comfy_env import HERE, REPO, comfy_python

pytestmark = pytest.mark.comfyui
STARTUP_S, RUN_S = 300, 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def run(self, prompt: dict) -> dict:
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": "saferope-tests"})
        assert status == 200, body
        pid, t0 = body["prompt_id"], time.time()
        while time.time() - t0 < RUN_S:
            hist = self.get(f"/history/{pid}")
            if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
                if hist[pid]["status"].get("status_str") in ("success", "error"):
                    return hist[pid]
            time.sleep(0.5)
        pytest.fail(f"prompt {pid} did not finish in {RUN_S} s")


@pytest.fixture(scope="module")
def server(comfyui_path: Path, driver: dict, tmp_path_factory: pytest.TempPathFactory):
    assets = Path(driver["work"]) / "assets"
    base = tmp_path_factory.mktemp("server_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "comfyui-saferope").symlink_to(REPO, target_is_directory=True)
    (base / "custom_nodes" / "saferope_test_support").symlink_to(HERE / "support_nodes", target_is_directory=True)
    yaml = base / "extra_model_paths.yaml"
    yaml.write_text(f"saferope_tests:\n    base_path: {assets}\n    saferope: adapters\n")
    port = _free_port()
    log = (base / "server.log").open("w")
    proc = subprocess.Popen([comfy_python(), str(comfyui_path / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port",
                             str(port), "--disable-api-nodes", "--base-directory", str(base),
                             "--extra-model-paths-config", str(yaml)], cwd=str(base), stdout=log, stderr=subprocess.STDOUT)
    srv = Server(f"http://127.0.0.1:{port}")
    try:
        t0 = time.time()
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited ({proc.returncode}):\n{(base / 'server.log').read_text()[-4000:]}")
            try:
                srv.get("/object_info/SafeRoPEApply")
                break
            except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
                if time.time() - t0 > STARTUP_S:
                    pytest.fail(f"ComfyUI did not start in {STARTUP_S} s:\n{(base / 'server.log').read_text()[-4000:]}")
                time.sleep(1.0)
        srv.base, srv.weights = base, str(assets / "tinyflux.safetensors")
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _prompt(weights: str, adapter: str, unsafe: bool) -> dict:
    cond = {"seed": 1, "length": 12, "concept": 3.0 if unsafe else 0.0, "triggers": 3 if unsafe else 0,
            "context_dim": 64, "pooled_dim": 32}
    ks = {"seed": 0, "steps": 3, "cfg": 3.5, "sampler_name": "euler", "scheduler": "simple", "positive": ["4", 0],
          "negative": ["5", 0], "latent_image": ["6", 0], "denoise": 1.0}
    return {
        "1": {"class_type": "SafeRoPETestTinyFlux", "inputs": {"path": weights, "weight_dtype": "default"}},
        "2": {"class_type": "SafeRoPEAdapterLoader", "inputs": {"adapter_name": adapter}},
        "3": {"class_type": "SafeRoPEApply", "inputs": {"model": ["1", 0], "adapter": ["2", 0], "strength": 1.0,
                                                        "threshold": -1.0, "start_percent": 0.0, "end_percent": 1.0}},
        "4": {"class_type": "SafeRoPETestConditioning", "inputs": cond},
        "5": {"class_type": "SafeRoPETestConditioning", "inputs": dict(cond, seed=99, length=7, concept=0.0, triggers=0)},
        "6": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": dict(ks, model=["1", 0])},
        "8": {"class_type": "KSampler", "inputs": dict(ks, model=["3", 0])},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": "base"}},
        "10": {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": "saferope"}},
        "11": {"class_type": "SafeRoPELRSVisualizer", "inputs": {"model": ["3", 0], "conditioning": ["4", 0],
                                                                 "width": 64, "height": 64, "noise_level": 0.0,
                                                                 "seed": 0, "prompt": ""}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": "lrs"}},
        "13": {"class_type": "PreviewAny", "inputs": {"source": ["11", 1]}},
    }


def _latent(server, out: dict):
    from safetensors.torch import load_file

    f = out["latents"][0]
    return load_file(str(server.base / "output" / f["subfolder"] / f["filename"]))["latent_tensor"]


@pytest.mark.parametrize("unsafe", [True, False], ids=["unsafe", "safe"])
def test_prompt_with_the_three_nodes_runs_over_http(server, unsafe):
    h = server.run(_prompt(server.weights, "main.safetensors", unsafe))
    assert h["status"]["status_str"] == "success", [m for m in h["status"]["messages"] if m[0] == "execution_error"]
    out = h["outputs"]
    base, prot = _latent(server, out["9"]), _latent(server, out["10"])
    if unsafe:
        assert not bool((base == prot).all())
    else:
        assert bool((base == prot).all())  # the gate did not fire: bit-identical
    img = out["12"]["images"][0]
    assert (server.base / "output" / img["subfolder"] / img["filename"]).stat().st_size > 1000
    text = out["13"]["text"][0]
    assert f"text tokens gated in any block: {3 if unsafe else 0} of 12" in text


@pytest.mark.parametrize("adapter,error,detail", [("wrong_heads.safetensors", "IncompatibleAdapterError", "num_heads"),
                                                  ("corrupt.safetensors", "AdapterFormatError", "corrupt.safetensors")])
def test_bad_adapters_fail_the_prompt_with_a_clear_message(server, adapter, error, detail):
    h = server.run(_prompt(server.weights, adapter, True))
    assert h["status"]["status_str"] == "error"
    err = [m for m in h["status"]["messages"] if m[0] == "execution_error"][0][1]
    assert err["exception_type"].endswith(error) and detail in err["exception_message"]
    assert err["node_type"] in ("SafeRoPEApply", "SafeRoPEAdapterLoader")


def test_object_info_describes_the_nodes(server):
    info = server.get("/object_info/SafeRoPEApply")["SafeRoPEApply"]
    assert info["display_name"] == "Apply SafeRoPE to Model" and info["category"] == "SafeRoPE"
    assert info["input"]["required"]["threshold"][1]["default"] == -1.0
    assert all(spec[1].get("tooltip") for spec in info["input"]["required"].values())
    vis = server.get("/object_info/SafeRoPELRSVisualizer")["SafeRoPELRSVisualizer"]
    assert vis["output"] == ["IMAGE", "STRING", "FLOAT", "BOOLEAN"]
    assert server.get("/object_info/SafeRoPERiskCheck")["SafeRoPERiskCheck"]["output"] == ["FLOAT", "BOOLEAN", "STRING"]


def test_example_workflows_are_served_as_templates(server):
    names = server.get("/workflow_templates").get("comfyui-saferope", [])
    assert sorted(names) == ["saferope_compare_base_vs_saferope", "saferope_flux_dev_text_to_image",
                             "saferope_risk_check_branch", "saferope_toy_demo"]
    for name in names:
        served = server.get(f"/api/workflow_templates/comfyui-saferope/{name}.json")
        assert served == json.loads((REPO / "example_workflows" / f"{name}.json").read_text())
