"""umarvel: universal multimodal retrievers trained the U-MARVEL way."""
__version__ = "0.1.0"


def __getattr__(name):
    if name == "Embedder":
        from umarvel.modeling.embedder import Embedder

        return Embedder
    raise AttributeError(f"module 'umarvel' has no attribute {name!r}")


__all__ = ["Embedder", "__version__"]
