"""``automl-compress info``: the environment, for bug reports."""

from __future__ import annotations

import platform


def run() -> int:
    """Print the versions of the package and of what it runs on.

    Those are the package, Python, platform, torch (and GPU), numpy and optional packages' versions.

    Returns:
        0.
    """
    import numpy
    import torch

    from automl_compress import __version__

    print(f"automl-compress {__version__}")
    print(f"python {platform.python_version()} on {platform.platform()}")
    print(f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        print(f"gpu: {torch.cuda.get_device_name(0)}")
    print(f"numpy {numpy.__version__}")
    for mod in ("gymnasium", "stable_baselines3", "sb3_contrib", "tensorboard", "safetensors"):
        try:
            m = __import__(mod)
            print(f"{mod} {getattr(m, '__version__', '?')}")
        except ImportError:
            print(f"{mod} not installed")
    return 0
