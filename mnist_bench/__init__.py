"""mnist-bench: measured answers about small MNIST classifiers."""
