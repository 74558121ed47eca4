"""Test-only hook: SIGKILLs its own training process at an exact point of a checkpoint write.

Imported by the crash tests' configs through ``custom_imports`` (tests/engine on PYTHONPATH).
``point='rename'`` dies just before the n-th rename onto ``name`` (the temporary file is complete
and fsynced, the final name not yet replaced); ``point='remove'`` dies just before the n-th removal
of ``name`` (its successor already exists)."""
import os
import os.path as osp
import signal

from mmengine.fileio.backends import LocalBackend
from mmengine.hooks import Hook

from zoo.registry import HOOKS


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


@HOOKS.register_module()
class CrashAtHook(Hook):
    def __init__(self, point: str, name: str, occurrence: int = 1):
        assert point in ("rename", "remove"), point
        self.point, self.name, self.occurrence = point, name, occurrence
        self.seen = 0

    def _hit(self, path) -> bool:
        if osp.basename(str(path)) != self.name:
            return False
        self.seen += 1
        return self.seen == self.occurrence

    def before_run(self, runner) -> None:
        hook = self
        if self.point == "rename":
            real = os.replace

            def replace(src, dst, *a, **k):
                if hook._hit(dst):
                    _die()
                return real(src, dst, *a, **k)
            os.replace = replace
        else:
            real_remove = LocalBackend.remove

            def remove(backend, path):
                if hook._hit(path):
                    _die()
                return real_remove(backend, path)
            LocalBackend.remove = remove


@HOOKS.register_module()
class WaitForFileHook(Hook):
    """Holds the training (after it took the work-dir lock) until ``path`` exists."""

    def __init__(self, path: str, timeout: float = 240.0):
        self.path, self.timeout = path, timeout

    def before_train(self, runner) -> None:
        import time
        open(self.path + ".waiting", "w").close()
        deadline = time.monotonic() + self.timeout
        while not osp.exists(self.path) and time.monotonic() < deadline:
            time.sleep(0.1)
