"""Loaded at interpreter start-up by `aitune-build run` (this folder is put first on PYTHONPATH): starts the serving
hook, after running the sitecustomize this one shadows, if there is one."""

import os as _os
import sys as _sys


def _aitune_start() -> None:
    here = _os.path.dirname(_os.path.abspath(__file__))
    try:
        from aitune_build.serve.bootstrap import start
    except ImportError:
        _sys.path.append(_os.path.dirname(_os.path.dirname(_os.path.dirname(here))))  # the aitune_build that ran `run`
        try:
            from aitune_build.serve.bootstrap import start
        except ImportError as e:
            _sys.stderr.write(f"aitune-build: serve: cannot import aitune_build ({e}); the application runs eager\n")
            return
    # First the sitecustomize this file shadows (a virtualenv's or a distribution's), then the hook.
    this = _sys.modules.pop("sitecustomize", None)
    saved = list(_sys.path)
    _sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or ".") != here]
    try:
        import sitecustomize  # noqa: F401
    except ImportError:
        pass
    except Exception as e:  # noqa: BLE001
        _sys.stderr.write(f"aitune-build: serve: the shadowed sitecustomize raised {type(e).__name__}: {e}\n")
    finally:
        _sys.path[:] = saved
        if "sitecustomize" not in _sys.modules and this is not None:
            _sys.modules["sitecustomize"] = this
    start()


_aitune_start()
