"""Processes of bear-train.py that start in milliseconds: `launch.Popen` and `launch.run` take the same arguments as
subprocess's, and fork a process from one that has already imported what the script imports (torch, gymnasium,
MuJoCo, matplotlib, TensorBoard): about 5 s of imports saved for each process, and dozens of tests start one.

The process is a real one, with its own pid, file descriptors, working directory, environment, process group or
session, signals, exit status and locks. It runs the script from its file as `python script.py args` would
(runpy, as __main__, with sys.argv and sys.path[0] set), and exits as Python exits: SystemExit's code, a traceback
and 1 for an uncaught exception, death by SIGINT for an uncaught KeyboardInterrupt. What it does not repeat is the
interpreter's start-up and the imports themselves, so tests of those (that one run does not import Ray, the README's
command) keep subprocess's processes.

BEAR_TESTS_SUBPROCESS=1 makes every launch a plain subprocess again, to compare the two.

The forking server is started on first use, in a session of its own, and stopped when the tests' process exits."""
import atexit
import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PRELOAD = ["numpy", "h5py", "tqdm", "torch", "torch._dynamo", "torch.export", "torch.utils.tensorboard", "gymnasium",
           "gymnasium.envs.mujoco.walker2d_v4", "mujoco", "imageio", "minari"]  # never ray: a test checks its absence

PIPE, DEVNULL, STDOUT = subprocess.PIPE, subprocess.DEVNULL, subprocess.STDOUT
TimeoutExpired, CompletedProcess = subprocess.TimeoutExpired, subprocess.CompletedProcess


# --------------------------------------------------------------------------------------------- the forking server
def serve(path: str) -> None:
    import importlib
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in PRELOAD:
            importlib.import_module(name)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401
    # no thread of Python's, and no computation yet (torch's OpenMP pool is made on first use, after the fork);
    # numpy's OpenBLAS may have started its pool, which it stops and restarts around a fork
    assert threading.active_count() == 1, "fork needs one thread"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        request, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        if os.fork() == 0:  # the watcher: reports the run's pid, waits for it, reports its exit status
            listener.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            pid = os.fork()
            if pid == 0:
                conn.close()
                _run(json.loads(request), fds)  # never returns
            for fd in fds:
                os.close(fd)
            conn.sendall(f"{pid}\n".encode())
            _, status = os.waitpid(pid, 0)
            try:
                conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
            except OSError:  # the tests' side no longer waits for it
                pass
            os._exit(0)
        for fd in fds:
            os.close(fd)
        conn.close()
        while True:  # reap finished watchers
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break


def _run(request: dict, fds: list) -> None:
    import runpy
    import traceback

    code = 1
    try:
        if request["new_session"]:
            os.setsid()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        if request["umask"] >= 0:
            os.umask(request["umask"])
        os.environ.clear()
        os.environ.update(request["env"])
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as Python starts
        unbuffered = request["env"].get("PYTHONUNBUFFERED", "") != ""
        sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.open(0, "rb", closefd=False), encoding="utf-8")
        sys.stdout = sys.__stdout__ = io.TextIOWrapper(io.open(1, "wb", closefd=False), encoding="utf-8",
                                                       line_buffering=unbuffered or os.isatty(1),
                                                       write_through=unbuffered)
        sys.stderr = sys.__stderr__ = io.TextIOWrapper(io.open(2, "wb", closefd=False), encoding="utf-8",
                                                       errors="backslashreplace", line_buffering=True)
        script = request["argv"][0]
        sys.argv = list(request["argv"])
        sys.path[0] = str(Path(script).resolve().parent)
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except KeyboardInterrupt:
            traceback.print_exc()
            code = -signal.SIGINT
        except BaseException:
            traceback.print_exc()
            code = 1
        threading._shutdown()  # as the interpreter ends: non-daemon threads, then atexit, then the streams
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        if code == -signal.SIGINT:  # an uncaught KeyboardInterrupt: Python ends by SIGINT, for its parent to see
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        os._exit(code & 0xFF)


# ------------------------------------------------------------------------------------------------- the client side
_server = {}


def _address() -> str:
    if "path" not in _server:
        folder = tempfile.mkdtemp(prefix="bear-launch-")
        path = os.path.join(folder, "socket")
        proc = subprocess.Popen([sys.executable, __file__, path], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                start_new_session=True, text=True)
        line = proc.stdout.readline()
        if line.strip() != "ready":
            proc.kill()
            raise RuntimeError(f"the forking server did not start (exit code {proc.wait()})")
        _server.update(path=path, proc=proc, folder=folder)
        atexit.register(_stop)
    return _server["path"]


def _stop() -> None:
    proc = _server.pop("proc", None)
    if proc:
        proc.kill()
        proc.wait()
        os.unlink(_server["path"])
        os.rmdir(_server["folder"])


def _forkable(args) -> bool:
    return (os.environ.get("BEAR_TESTS_SUBPROCESS", "") in ("", "0") and len(args) >= 2
            and str(args[0]) == sys.executable and str(args[1]).endswith(".py") and not str(args[1]).startswith("-"))


class Popen:
    """subprocess.Popen's interface, for `[sys.executable, script.py, *args]`; anything else is subprocess's own."""

    def __new__(cls, args, **kwargs):
        if not _forkable(args):
            return subprocess.Popen(args, **kwargs)
        return super().__new__(cls)

    def __init__(self, args, stdin=None, stdout=None, stderr=None, cwd=None, env=None, text=False,
                 universal_newlines=None, start_new_session=False, umask=-1):
        self.args, self.returncode = args, None
        text = text or bool(universal_newlines)
        mine, theirs = [], []  # our ends of the pipes, and the descriptors the process gets

        def descriptor(spec, fd):
            if spec is None:
                return os.dup(fd)
            if spec == DEVNULL:
                return os.open(os.devnull, os.O_RDWR)
            if spec == PIPE:
                r, w = os.pipe()
                mine.append(r if fd else w)
                return w if fd else r
            return os.dup(spec if isinstance(spec, int) else spec.fileno())

        stdin_fd = descriptor(stdin if stdin is not None else DEVNULL, 0)
        self.stdin = self._wrap(mine.pop(), "w", text) if stdin == PIPE else None
        out_fd = descriptor(stdout, 1)
        self.stdout = self._wrap(mine.pop(), "r", text) if stdout == PIPE else None
        err_fd = os.dup(out_fd) if stderr == STDOUT else descriptor(stderr, 2)
        self.stderr = self._wrap(mine.pop(), "r", text) if stderr == PIPE else None
        theirs = [stdin_fd, out_fd, err_fd]
        request = {"argv": [str(a) for a in args[1:]], "cwd": str(cwd or os.getcwd()),
                   "env": dict(os.environ if env is None else env), "new_session": bool(start_new_session),
                   "umask": umask}
        self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._conn.connect(_address())
            socket.send_fds(self._conn, [json.dumps(request).encode()], theirs)
        finally:
            for fd in theirs:
                os.close(fd)
        self._reader = self._conn.makefile("r")
        self.pid = int(self._reader.readline())

    @staticmethod
    def _wrap(fd, mode, text):
        return io.open(fd, mode + ("" if text else "b"), **({} if not text else {"encoding": "utf-8"}))

    def poll(self):
        if self.returncode is None and select.select([self._conn], [], [], 0)[0]:
            self._collect()
        return self.returncode

    def wait(self, timeout=None):
        if self.returncode is None:
            if not select.select([self._conn], [], [], timeout)[0]:
                raise TimeoutExpired(self.args, timeout)
            self._collect()
        return self.returncode

    def _collect(self):
        line = self._reader.readline()
        self.returncode = int(line)
        self._reader.close()
        self._conn.close()

    def communicate(self, input=None, timeout=None):
        if self.stdin:
            if input:
                self.stdin.write(input)
            self.stdin.close()
        deadline = None if timeout is None else time.monotonic() + timeout
        read = {}
        threads = [threading.Thread(target=lambda s=s: read.__setitem__(s, s.read()), daemon=True)
                   for s in (self.stdout, self.stderr) if s]
        for t in threads:
            t.start()
        for t in threads:
            t.join(None if deadline is None else max(0, deadline - time.monotonic()))
            if t.is_alive():
                raise TimeoutExpired(self.args, timeout)
        self.wait(None if deadline is None else max(0, deadline - time.monotonic()))
        for s in (self.stdout, self.stderr):
            if s:
                s.close()
        return tuple(read.get(s) if s else None for s in (self.stdout, self.stderr))

    def send_signal(self, sig):
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self):
        self.send_signal(signal.SIGTERM)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for s in (self.stdout, self.stderr, self.stdin):
            if s:
                s.close()
        self.wait()


def run(args, capture_output=False, timeout=None, input=None, **kwargs):
    """subprocess.run's interface (without check), with the process from Popen above."""
    if not _forkable(args):
        return subprocess.run(args, capture_output=capture_output, timeout=timeout, input=input, **kwargs)
    if capture_output:
        kwargs.update(stdout=PIPE, stderr=PIPE)
    if input is not None:
        kwargs["stdin"] = PIPE
    proc = Popen(args, **kwargs)
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return CompletedProcess(args, proc.returncode, out, err)


if __name__ == "__main__":
    sys.path.pop(0)  # not tests/: the runs get the script's folder as python gives it
    serve(sys.argv[1])
