"""The depth study: experiments, storage and coordination, tables and report around mnist_bench."""

import mnist_bench as _mnist_bench  # noqa: F401 - under `python -m study.<command>`, Ctrl-C is one line from here on
