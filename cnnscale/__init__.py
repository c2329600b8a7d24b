"""cnnscale: a scaling-study harness for classic CNNs on CIFAR-10, built on Hugging Face Accelerate."""

__all__ = ["__version__"]
__version__ = "0.1.0"
