"""mnist-bench: measured answers about small MNIST classifiers."""

import os as _os
import sys as _sys

# MKL's strict conditional numerical reproducibility: a matrix product's bits never depend on where its
# operands sit in memory, so a network's slice of a stacked pack computes exactly what the network computes
# alone (tests/test_pack.py fails without it). Set before PyTorch loads MKL; an explicit setting wins.
_os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

if _sys.argv[:1] == ["-m"]:  # `python -m <a command>` is still locating it: from here on, a Ctrl-C is one line
    from .cli import starting as _starting

    _starting("__main__")
