"""BrokerClient tells apart the ways a broker URL can be wrong (the sidebar shows which)."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from jupyter_elastic_gpu.broker.client import BrokerClient, BrokerError

ANSWERS = {
    "/api/me": (200, "application/json", b'{"user": "alice"}'),
    "/api/html": (200, "text/html", b"<html>a login page</html>"),
    "/api/moved": (302, "text/html", b""),
    "/api/broken": (500, "application/json", b'{"message": "broker exploded"}'),
    "/api/denied": (403, "application/json", b'{"message": "only admins"}'),
}


@pytest.fixture
def server():
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            status, kind, body = ANSWERS[self.path]
            self.send_response(status)
            self.send_header("Content-Type", kind)
            if status == 302:
                self.send_header("Location", "/api/me")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}/api/"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.mark.parametrize(
    "path, status, reason, words",
    [
        ("html", 200, "bad_answer", "without JSON"),
        ("moved", 302, "bad_answer", "answered 302"),
        ("broken", 500, "broker_error", "broker exploded"),
        ("denied", 403, "refused", "only admins"),
    ],
)
def test_each_failure_has_its_reason(server, path, status, reason, words):
    client = BrokerClient(server, "tok", timeout=5)
    with pytest.raises(BrokerError) as e:
        client._call("GET", path)
    assert (e.value.status, e.value.reason) == (status, reason) and words in e.value.message


def test_an_answer_and_no_answer(server):
    assert BrokerClient(server, "tok", timeout=5).me() == {"user": "alice"}
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(BrokerError) as e:
        BrokerClient(f"http://127.0.0.1:{port}/api/", "tok", timeout=2).me()
    assert (e.value.status, e.value.reason) == (None, "unreachable")
