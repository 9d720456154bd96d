"""A real ComfyUI server for the toy-model tests, and the frontend-workflow → API-prompt conversion.

``ComfyServer.start`` runs ``main.py --cpu`` on 127.0.0.1 with a given base directory (whose
``custom_nodes`` and ``models`` the caller prepared); ``run`` POSTs an API-format prompt to
``/prompt`` and polls ``/history`` until it finished. :func:`api_prompt` turns a workflow file as the
frontend saves it (``example_workflows/*.json``) into the API format, mapping each node's
``widgets_values`` onto its inputs in the order the server's ``/object_info`` lists them (what the
frontend does when it queues a prompt).
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

FRONTEND_ONLY = {"MarkdownNote", "Note", "Reroute"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, proc: subprocess.Popen, url: str, base: Path, log: Path) -> None:
        self.proc, self.url, self.base, self.log = proc, url, base, log

    @classmethod
    def start(cls, python: str, comfyui: Path, base: Path, ready_path: str, startup_s: float) -> ComfyServer:
        port = free_port()
        log = base / "server.log"
        with log.open("w") as f:
            proc = subprocess.Popen([python, str(comfyui / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port",
                                     str(port), "--disable-api-nodes", "--base-directory", str(base),
                                     "--database-url", "sqlite:///:memory:"],
                                    cwd=str(base), stdout=f, stderr=subprocess.STDOUT)
        srv = cls(proc, f"http://127.0.0.1:{port}", base, log)
        t0 = time.time()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited ({proc.returncode}):\n{srv.log_tail()}")
            try:
                srv.get(ready_path)
                return srv
            except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
                if time.time() - t0 > startup_s:
                    srv.stop()
                    raise RuntimeError(f"ComfyUI did not start in {startup_s} s:\n{srv.log_tail()}") from None
                time.sleep(1.0)

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text()[-n:] if self.log.is_file() else ""

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def run(self, prompt: dict, timeout_s: float) -> dict:
        """POST ``prompt``; the finished ``/history`` entry (``status_str`` success or error)."""
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": "saferope-toy-tests"})
        if status != 200:
            raise AssertionError(f"POST /prompt refused ({status}): {json.dumps(body)[:3000]}")
        pid, t0 = body["prompt_id"], time.time()
        while time.time() - t0 < timeout_s:
            hist = self.get(f"/history/{pid}")
            st = hist.get(pid, {}).get("status", {})
            if st.get("completed") is not None and st.get("status_str") in ("success", "error"):
                return hist[pid]
            time.sleep(0.25)
        raise AssertionError(f"prompt {pid} did not finish in {timeout_s} s:\n{self.log_tail()}")

    def output_file(self, entry: dict) -> Path:
        """Path of one file of a node's output list (``{"filename", "subfolder", "type"}``)."""
        return self.base / entry["type"] / entry["subfolder"] / entry["filename"]


def execution_seconds(history: dict) -> float:
    """Seconds from ``execution_start`` to ``execution_success`` in a history entry's status messages."""
    stamps = {name: data.get("timestamp") for name, data in history["status"]["messages"]}
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000.0


def errors(history: dict) -> list:
    return [m for m in history["status"]["messages"] if m[0] == "execution_error"]


def _is_widget(spec: list) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def api_prompt(workflow: dict, object_info: dict) -> dict:
    """The API-format prompt the frontend would queue for ``workflow`` (frontend-only nodes dropped)."""
    links = {lk[0]: lk for lk in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        info = object_info[node["type"]]["input"]
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values", []))
        inputs: dict = {}
        for section in ("required", "optional"):
            for name, spec in info.get(section, {}).items():
                if name in linked:
                    _, src, slot, *_ = links[linked[name]]
                    inputs[name] = [str(src), slot]
                    if _is_widget(spec):  # a widget converted to a socket still holds a value
                        values.pop(0)
                elif _is_widget(spec) and values:
                    inputs[name] = values.pop(0)
                    opts = spec[1] if len(spec) > 1 else {}
                    if spec[0] == "INT" and opts.get("control_after_generate", name in ("seed", "noise_seed")):
                        values.pop(0)  # "fixed" / "randomize": a frontend-only widget
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
