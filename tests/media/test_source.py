"""The one media source reader (gemma3n/media/source.py): every kind of source, every policy, served for real."""
from __future__ import annotations

import base64
import http.server
import threading

import pytest

from gemma3n.media import MediaError, MediaPolicy, read_source
from gemma3n.processor.audio import AudioError, load_audio
from gemma3n.processor.image import ImageError, load_image

PAYLOAD = bytes(range(256)) * 8


@pytest.fixture(scope="module")
def web():
    """A local HTTP server: /data (the payload), /slow (answers after the client's timeout), /redirect (to file:)."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/slow":
                threading.Event().wait(2.0)
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "file:///etc/passwd")
                self.end_headers()
                return
            if self.path not in ("/data", "/slow"):
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_bytes_files_and_data_urls(tmp_path):
    path = tmp_path / "clip.bin"
    path.write_bytes(PAYLOAD)
    assert read_source(PAYLOAD, "audio") == PAYLOAD
    assert read_source(path, "audio") == path and read_source(str(path), "audio") == path
    assert read_source(open(path, "rb"), "audio") == PAYLOAD
    encoded = base64.b64encode(PAYLOAD).decode()
    assert read_source(f"data:audio/wav;base64,{encoded}", "audio") == PAYLOAD
    assert read_source("data:text/plain,a%20b", "image") == b"a b"
    assert read_source(encoded, "image", MediaPolicy(allow_bare_base64=True)) == PAYLOAD


@pytest.mark.parametrize("source, policy, message, status", [
    (b"", MediaPolicy(), "empty", 400),
    ("missing.wav", MediaPolicy(), "audio file not found: missing.wav", 400),
    ("data:audio/wav;base64,@@@", MediaPolicy(), "invalid base64", 400),
    ("data:audio/wav;base64" + "A" * 8, MediaPolicy(), "malformed data: URL", 400),
    ("ftp://host/a.wav", MediaPolicy(), "only http", 400),
    (PAYLOAD, MediaPolicy(max_bytes=100), "larger than the limit of 100 bytes", 413),
    ("data:audio/wav;base64," + base64.b64encode(PAYLOAD).decode(), MediaPolicy(max_bytes=100), "limit", 413),
    (3.5, MediaPolicy(), "cannot read an audio from a float", 400),
])
def test_errors_say_what_to_do(source, policy, message, status):
    with pytest.raises(MediaError, match=message) as info:
        read_source(source, "audio", policy)
    assert info.value.status == status


def test_a_server_policy_never_reads_local_files(tmp_path):
    path = tmp_path / "secret.png"
    path.write_bytes(PAYLOAD)
    with pytest.raises(MediaError, match="local files are never read"):
        read_source(str(path), "image", MediaPolicy(allow_files=False))


def test_network_only_when_allowed_with_caps_and_timeouts(web):
    with pytest.raises(MediaError, match="network is off.*--allow-remote-media"):
        read_source(f"{web}/data", "image", MediaPolicy(network_hint="start the server with --allow-remote-media"))
    assert read_source(f"{web}/data", "image", MediaPolicy(allow_network=True)) == PAYLOAD
    with pytest.raises(MediaError, match="limit") as info:
        read_source(f"{web}/data", "image", MediaPolicy(allow_network=True, max_bytes=1000))
    assert info.value.status == 413
    with pytest.raises(MediaError, match="download failed"):
        read_source(f"{web}/slow", "image", MediaPolicy(allow_network=True, timeout_seconds=0.3))
    with pytest.raises(MediaError, match="download failed|redirected"):
        read_source(f"{web}/redirect", "image", MediaPolicy(allow_network=True))
    with pytest.raises(MediaError, match="download failed.*404"):
        read_source(f"{web}/nothing", "image", MediaPolicy(allow_network=True))


def test_every_media_kind_reads_through_it(web):
    """Images and audio take http(s) sources through the same reader (here: not media, so decoding refuses)."""
    with pytest.raises(ImageError, match="network is off"):
        load_image(f"{web}/data")
    with pytest.raises(ImageError, match="not an image"):
        load_image(f"{web}/data", allow_network=True)
    with pytest.raises(AudioError, match="network is off"):
        load_audio(f"{web}/data")
    with pytest.raises(AudioError, match="cannot decode"):
        load_audio(f"{web}/data", allow_network=True)
