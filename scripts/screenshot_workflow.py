"""Screenshot an example workflow in the real ComfyUI frontend (headless Chromium, local server).

    python scripts/screenshot_workflow.py --comfyui /path/to/ComfyUI --comfy-python /path/to/venv/bin/python \\
        [--workflow example_workflows/saferope_flux_dev_text_to_image.json] [--out docs/comfyui-example-workflow.png]

Needs ``playwright`` (pip) in the Python running this script and a Chromium (Debian: ``apt-get install
chromium``); ComfyUI runs with ``--comfy-python`` on 127.0.0.1 with a temporary base directory
whose custom_nodes holds this repository and whose model folders hold empty placeholder files
named like the workflow's models (so combos show them; nothing is loaded or sampled). The script
fails if any node of the workflow is unknown to the frontend, and can dump the graph as the
frontend re-serialises it (``--dump``) to compare with the file.

With ``--run`` the frontend also queues the workflow and the screenshot waits for its outputs (for
workflows that run on a CPU, such as ``saferope_toy_demo.json``); ``--adapter FILE`` puts a real
adapter under the name the workflow's Load SafeRoPE Adapter node uses instead of an empty
placeholder:

    python scripts/screenshot_workflow.py --comfyui /path/to/ComfyUI --comfy-python /path/to/venv/bin/python \\
        --workflow example_workflows/saferope_toy_demo.json --run --adapter demo_out/adapter.safetensors \\
        --out docs/comfyui-toy-workflow.png
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
# placeholder files: folder under models/ for the widget values the example workflows use
PLACEHOLDERS = {"UNETLoader": ["diffusion_models"], "DualCLIPLoader": ["text_encoders", "text_encoders"],
                "VAELoader": ["vae"], "SafeRoPEAdapterLoader": ["saferope"]}
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Workflow.ShowMissingModelsWarning": False,
            "Comfy.Validation.Workflows": True, "Comfy.UseNewMenu": "Top", "Comfy.Minimap.Visible": False}
log = logging.getLogger("screenshot")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_base(base: Path, workflow: dict, adapter: Path | None = None) -> None:
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / "comfyui-saferope").symlink_to(REPO, target_is_directory=True)
    for node in workflow["nodes"]:
        for folder, value in zip(PLACEHOLDERS.get(node["type"], []), node.get("widgets_values", [])):
            (base / "models" / folder).mkdir(parents=True, exist_ok=True)
            if adapter is not None and node["type"] == "SafeRoPEAdapterLoader":
                shutil.copyfile(adapter, base / "models" / folder / value)
            else:
                (base / "models" / folder / value).touch()
    user = base / "user" / "default"
    user.mkdir(parents=True)
    (user / "comfy.settings.json").write_text(json.dumps(SETTINGS))


def start_comfyui(args: argparse.Namespace, base: Path, port: int) -> subprocess.Popen:
    logf = (base / "server.log").open("w")
    proc = subprocess.Popen([args.comfy_python, str(Path(args.comfyui) / "main.py"), "--cpu", "--listen", "127.0.0.1",
                             "--port", str(port), "--disable-api-nodes", "--base-directory", str(base)],
                            cwd=str(base), stdout=logf, stderr=subprocess.STDOUT)
    t0 = time.time()
    while time.time() - t0 < args.timeout:
        if proc.poll() is not None:
            raise SystemExit(f"ComfyUI exited:\n{(base / 'server.log').read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/object_info/SafeRoPEApply", timeout=5).read()
            return proc
        except OSError:
            time.sleep(1)
    proc.terminate()
    raise SystemExit(f"ComfyUI did not start in {args.timeout} s")


def wait_for_run(port: int, timeout: float) -> dict:
    """Poll the server until the queued prompt finished; its /history entry (raises if it failed)."""
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while time.time() - t0 < timeout:
        history = json.loads(urllib.request.urlopen(url + "/history", timeout=10).read())
        queue = json.loads(urllib.request.urlopen(url + "/queue", timeout=10).read())
        done = [h for h in history.values() if h.get("status", {}).get("completed") is not None]
        if done and not queue.get("queue_running") and not queue.get("queue_pending"):
            status = done[-1]["status"]
            if status.get("status_str") != "success":
                errors = [m for m in status.get("messages", []) if m[0] == "execution_error"]
                raise SystemExit(f"the workflow failed in ComfyUI: {json.dumps(errors)[:3000]}")
            return done[-1]
        time.sleep(0.5)
    raise SystemExit(f"the workflow did not finish in {timeout} s")


def shoot(args: argparse.Namespace, port: int, workflow: dict) -> dict:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": args.width, "height": args.height}, device_scale_factor=1)
        page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
        page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=args.timeout * 1000)
        page.wait_for_timeout(2000)
        page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", workflow)
        page.wait_for_timeout(1500)
        report = page.evaluate("""() => {
            const g = window.app.graph;
            const known = window.LiteGraph.registered_node_types;
            const nodes = g._nodes || g.nodes;
            return {missing: nodes.filter(n => !(n.type in known)).map(n => n.type),
                    count: nodes.length, serialized: g.serialize()};
        }""")
        if args.run:
            page.evaluate("""async () => {
                if (typeof window.app.queuePrompt === 'function') { await window.app.queuePrompt(0, 1); }
                else { await window.app.extensionManager.command.execute('Comfy.QueuePrompt'); } }""")
            run = wait_for_run(port, args.timeout)
            report["outputs"] = sorted(run.get("outputs", {}))
            page.wait_for_timeout(3000)  # let the frontend show the images
        for sel in ("button[aria-label='Close']", ".p-dialog-close-button"):  # dismiss any dialog over the canvas
            for el in page.query_selector_all(sel):
                try:
                    el.click(timeout=500)
                except Exception:  # noqa: BLE001 - a dialog that is gone already
                    pass
        page.evaluate("""() => { try { window.app.extensionManager.command.execute('Comfy.Canvas.FitView'); }
                               catch (e) { window.app.canvas.ds.scale = 0.6; } window.app.graph.setDirtyCanvas(true, true); }""")
        page.wait_for_timeout(1500)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.out))
        report["frontend_version"] = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ || ''")
        browser.close()
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description="Screenshot an example workflow in the real ComfyUI frontend.")
    ap.add_argument("--comfyui", required=True, help="ComfyUI tree (has main.py)")
    ap.add_argument("--comfy-python", default=sys.executable, help="Python with ComfyUI's requirements")
    ap.add_argument("--workflow", type=Path, default=REPO / "example_workflows" / "saferope_flux_dev_text_to_image.json")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "comfyui-example-workflow.png")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--width", type=int, default=2400)
    ap.add_argument("--height", type=int, default=1350)
    ap.add_argument("--timeout", type=int, default=240, help="seconds to wait for the server / the frontend")
    ap.add_argument("--dump", type=Path, help="write the graph as the frontend re-serialised it")
    ap.add_argument("--run", action="store_true", help="queue the workflow in the frontend and wait for its outputs")
    ap.add_argument("--adapter", type=Path, help="a real adapter for the workflow's Load SafeRoPE Adapter node")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    workflow = json.loads(args.workflow.read_text())
    with tempfile.TemporaryDirectory(prefix="saferope-shot-") as tmp:
        base = Path(tmp)
        if args.adapter is not None and not args.adapter.is_file():
            raise SystemExit(f"--adapter {args.adapter}: no such file")
        prepare_base(base, workflow, args.adapter)
        port = free_port()
        proc = start_comfyui(args, base, port)
        try:
            report = shoot(args, port, workflow)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    if args.dump:
        args.dump.write_text(json.dumps(report["serialized"], indent=1))
    log.info("frontend %s: %d nodes loaded, missing node types: %s; screenshot: %s",
             report["frontend_version"] or "?", report["count"], report["missing"] or "none", args.out)
    if args.run:
        log.info("ran in ComfyUI: outputs of nodes %s", ", ".join(report["outputs"]))
    return 1 if report["missing"] else 0


if __name__ == "__main__":
    sys.exit(main())
