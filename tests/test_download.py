"""Downloads from a local HTTP server on 127.0.0.1: a cut connection resumed with Range, a wrong size, a 404,
and a corrupt cached file replaced only by a download that passes the checks."""
import http.server
import threading

import pytest

from conftest import write_d4rl_file


class Server:
    """Serves named byte strings; `cut_after` closes the first response to a path after that many bytes."""

    def __init__(self):
        self.files, self.cut_after, self.requests = {}, {}, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                cut = server.cut_after.pop(self.path, None)
                self.wfile.write(body[start:cut])
                self.wfile.flush()
                if cut is not None:
                    self.close_connection = True

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/offline_rl"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server(monkeypatch, tmp_path):
    s = Server()
    monkeypatch.setenv("BEAR_D4RL_BASE_URL", s.url)
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "cache"))
    yield s
    s.httpd.shutdown()


PATH = "/offline_rl/gym_mujoco_v2/walker2d_random-v2.hdf5"


def good_file(tmp_path, bear, monkeypatch, n=300):
    src = tmp_path / "src.hdf5"
    write_d4rl_file(src, n=n)
    body = src.read_bytes()
    monkeypatch.setitem(bear.V2_SIZES, "walker2d", [len(body)] + bear.V2_SIZES["walker2d"][1:])  # a small "published" size
    return body


def test_a_cut_download_resumes_with_a_range_request(bear, server, tmp_path, monkeypatch):
    body = good_file(tmp_path, bear, monkeypatch)
    server.files[PATH] = body
    server.cut_after[PATH] = len(body) // 3
    data, path, env, source, notes = bear.find_dataset(bear.resolve_dataset("walker2d-random-v2"))
    assert source == "download" and notes == [] and path.read_bytes() == body
    assert server.requests == [(PATH, None), (PATH, f"bytes={len(body) // 3}-")]
    assert sorted(p.name for p in path.parent.iterdir()) == ["walker2d_random-v2.hdf5"]  # no .part left behind
    assert len(data["observations"]) == 300


def test_a_cut_download_left_from_an_earlier_run_is_resumed(bear, server, tmp_path, monkeypatch):
    body = good_file(tmp_path, bear, monkeypatch)
    server.files[PATH] = body
    part = tmp_path / "cache" / "walker2d_random-v2.hdf5.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(body[:1000])
    bear.find_dataset(bear.resolve_dataset("walker2d-random-v2"))
    assert server.requests == [(PATH, "bytes=1000-")]
    assert (tmp_path / "cache" / "walker2d_random-v2.hdf5").read_bytes() == body


def test_a_wrong_size_is_never_renamed_into_place(bear, server, tmp_path, monkeypatch):
    body = good_file(tmp_path, bear, monkeypatch)
    server.files["/offline_rl/gym_mujoco_v2/hopper_medium-v2.hdf5"] = body  # not hopper-medium's published size
    with pytest.raises(bear.UserError, match=r"got \d+ bytes, D4RL publishes 152756557.*place it at"):
        bear.find_dataset(bear.resolve_dataset("hopper-medium-v2"))
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_404_names_the_url_and_the_path(bear, server, tmp_path):
    with pytest.raises(bear.UserError) as e:
        bear.find_dataset(bear.resolve_dataset("ant-expert-v2"))
    assert "Not Found" in str(e.value) and f"{server.url}/gym_mujoco_v2/ant_expert-v2.hdf5" in str(e.value)
    assert str(tmp_path / "cache" / "ant_expert-v2.hdf5") in str(e.value)
    assert not (tmp_path / "cache" / "ant_expert-v2.hdf5").exists()


def test_a_corrupt_cached_file_is_replaced_only_by_a_good_download(bear, server, tmp_path, monkeypatch):
    body = good_file(tmp_path, bear, monkeypatch)
    cached = tmp_path / "cache" / "walker2d_random-v2.hdf5"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(body[: len(body) // 2])  # a truncated file, as a cut download without checks leaves
    server.files[PATH] = b"x" * len(body)  # right size, but not HDF5: must not replace the cached file
    with pytest.raises(bear.UserError, match="fails its checks"):
        bear.find_dataset(bear.resolve_dataset("walker2d-random-v2"))
    assert cached.read_bytes() == body[: len(body) // 2]
    server.files[PATH] = body
    data, path, _, source, _ = bear.find_dataset(bear.resolve_dataset("walker2d-random-v2"))
    assert source == "download" and cached.read_bytes() == body


def test_a_corrupt_cached_file_offline_is_an_error_naming_it(bear, server, tmp_path, monkeypatch):
    monkeypatch.setenv("BEAR_D4RL_BASE_URL", "http://127.0.0.1:9/offline_rl")
    cached = tmp_path / "cache" / "walker2d_random-v2.hdf5"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(bear.UserError) as e:
        bear.find_dataset(bear.resolve_dataset("walker2d-random-v2"))
    message = str(e.value)
    assert str(cached) in message and "not a readable HDF5 file" in message and "place a good copy" in message
    assert cached.read_bytes() == b"\x89HDF\r\n\x1a\n" + b"\0" * 100  # untouched, and no regeneration either
    assert sorted(p.name for p in cached.parent.iterdir()) == ["walker2d_random-v2.hdf5"]
