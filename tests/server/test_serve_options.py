"""`gemma3n serve` flags and the opt-in remote media fetch."""
from __future__ import annotations

import base64
import http.server
import io
import threading

import httpx
import pytest

from gemma3n.cli import main
from gemma3n.server import ServerSettings

from .conftest import LIMITS, RunningServer


def test_bad_limit_is_a_one_line_error_before_loading(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--model", str(tmp_path / "missing"), "--max-batch", "0"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --max-batch: must be >= 1, got 0" in err and "Traceback" not in err


@pytest.fixture()
def png_site():
    from PIL import Image
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (0, 255, 0)).save(buffer, format="PNG")
    png = buffer.getvalue()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/cat.png":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args):
            pass

    site = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{site.server_port}"
    site.shutdown()


def _ask(server, url: str) -> httpx.Response:
    part = {"type": "image_url", "image_url": {"url": url}}
    body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": [part]}]}
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)


def test_remote_media_only_when_allowed(model, server, png_site):
    assert "--allow-remote-media" in _ask(server, png_site + "/cat.png").json()["error"]["message"]
    remote = RunningServer(model, ServerSettings(model_name="tiny", allow_remote_media=True, **LIMITS))
    try:
        # Fetched and decoded; this tiny checkpoint is text-only, so the image itself is then refused.
        assert "text-only" in _ask(remote, png_site + "/cat.png").json()["error"]["message"]
        missing = _ask(remote, png_site + "/nothing.png")
        assert missing.status_code == 400 and "download failed" in missing.json()["error"]["message"]
        local = _ask(remote, "file:///etc/hostname")
        assert local.status_code == 400 and "local files are never read" in local.json()["error"]["message"]
        png = base64.b64encode(b"\x89PNG not really").decode()
        assert "not a readable image" in _ask(remote, "data:image/png;base64," + png).json()["error"]["message"]
    finally:
        remote.close()
