"""umarvel: universal multimodal retrievers trained the U-MARVEL way."""
import os

# torch's CPU threads meet at an OpenMP barrier after every parallel op. By default a thread that
# arrives first spins there; when another process holds the core its partner needs, it spins for
# the partner's whole time slice, and a tiny-model training step took 50x longer on a loaded
# machine (scripts/bench_threads.py, BENCHMARKS.md). PASSIVE threads sleep at the barrier instead.
# Read once, when torch loads OpenMP: this must run before torch is imported; a value the user
# set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
__version__ = "0.1.0"


def __getattr__(name):
    if name == "Embedder":
        from umarvel.modeling.embedder import Embedder

        return Embedder
    raise AttributeError(f"module 'umarvel' has no attribute {name!r}")


__all__ = ["Embedder", "__version__"]
