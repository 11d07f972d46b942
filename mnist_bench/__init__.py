"""mnist-bench: measured answers about small MNIST classifiers."""

import sys as _sys

if _sys.argv[:1] == ["-m"]:  # `python -m <a command>` is still locating it: from here on, a Ctrl-C is one line
    from .cli import starting as _starting

    _starting("__main__")
