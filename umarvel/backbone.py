"""Load a backbone of a supported family (umarvel/backbones) and its processor from a local directory.

Embedding models use the family's bare model class (no lm_head: an unused head breaks
DDP/ZeRO); the reranker asks for the LM head. Attention mode is switched on the loaded model.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from umarvel import backbones
from umarvel.errors import UmarvelError
from umarvel.weights import check_model_weights


def resolve_device(name: str = "auto") -> torch.device:
    """`model.device` as a torch device; a name torch does not know, or a CUDA device this
    machine lacks, is a clear error here rather than a CUDA traceback at the first forward."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UmarvelError(f"model.device={name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UmarvelError(f"model.device={name}: this machine has no usable CUDA device "
                               "(torch.cuda.is_available() is false); set model.device=auto or cpu")
        if device.index is not None and device.index >= count:
            raise UmarvelError(f"model.device={name}: this machine has {count} CUDA device(s), "
                               f"cuda:0 to cuda:{count - 1}")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


@contextlib.contextmanager
def quiet_transformers():
    """Hide the load report (e.g. the lm_head we deliberately leave out) and per-tensor progress."""
    import warnings

    from transformers.utils import logging

    previous = logging.get_verbosity()
    bars_were_enabled = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        logging.set_verbosity(previous)
        if bars_were_enabled:
            logging.enable_progress_bar()


def check_backbone_dir(path: str | Path) -> backbones.Family:
    """Return the family of a local model directory, or raise a clear error."""
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise UmarvelError(
            f"backbone {path} is not a model directory (no config.json); give a local path, "
            "e.g. checkpoints/Qwen2-VL-7B-Instruct or one made by `umarvel make-tiny-model`"
        )
    try:
        model_type = AutoConfig.from_pretrained(path).model_type
    except (OSError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        raise UmarvelError(f"{path / 'config.json'}: not a readable model config ({err}); restore the file "
                           "or make the model directory again") from None
    family = backbones.for_model_type(model_type, where=f"backbone {path}")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise UmarvelError(f"backbone {path} has no weights (no *.safetensors file): the model directory is "
                           "incomplete; copy or download it again")
    check_model_weights(path)
    return family


def load_backbone(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    attention: str = "bidirectional",
    with_lm_head: bool = False,
):
    """Load the bare multimodal model (or, with_lm_head, the generative one) in `attention` mode."""
    loader = check_backbone_dir(path).model_loader(with_lm_head)
    with quiet_transformers(), _whole_weights():
        model, report = loader.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation,
                                               output_loading_info=True)
    # Unused weights (a released checkpoint's lm_head and sim.temp) are fine; missing ones
    # would leave random layers in a model that "loads" and embeds garbage.
    missing = sorted(report["missing_keys"])
    if missing and not with_lm_head:
        raise UmarvelError(f"backbone {path}: {len(missing)} weights of {loader.__name__} are not in its files "
                           f"(e.g. {', '.join(missing[:3])}); is it a complete checkpoint of this family?")
    set_attention_mode(model, attention)
    return model


@contextlib.contextmanager
def _whole_weights():
    """Load whole weights even after a ZeRO-3 TrainingArguments was made in this process.

    transformers then loads under `deepspeed.zero.Init` (partitioned, with no engine to gather
    them for a forward): the reranker stage builds its arguments, hence its process group,
    before loading the recall model. DeepSpeed partitions a trained model at initialize.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    active = hf_deepspeed._hf_deepspeed_config_weak_ref  # no public getter; restored below
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = active


def language_model(model) -> torch.nn.Module:
    """The text decoder inside a (possibly PEFT-wrapped, possibly LM-headed) backbone."""
    attribute = backbones.of(model).language_model
    for name, module in model.named_modules():
        if name.split(".")[-1] == attribute and hasattr(module, "layers"):
            return module
    raise UmarvelError(f"no language_model found in {type(model).__name__}")


def set_attention_mode(model, attention: str) -> None:
    """Make the language model causal or bidirectional, the family's way (see its `set_causal`)."""
    if attention not in ("causal", "bidirectional"):
        raise UmarvelError(f"attention must be 'causal' or 'bidirectional', got {attention!r}")
    causal = attention == "causal"
    backbones.of(model).set_causal(language_model(model), causal)
    text_config = getattr(model.config, "text_config", None)
    if text_config is not None:
        text_config.is_causal = causal


def load_processor(path: str | Path, min_pixels: int | None = None, max_pixels: int | None = None,
                   image_backend: str | None = None):
    """The checkpoint's own processor, right-padding, with the configured image pixel bounds and,
    if named, the image processor of that transformers backend ("torchvision", "pil")."""
    from transformers import AutoImageProcessor, AutoProcessor

    if not any((Path(path) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise UmarvelError(
            f"{path} has no tokenizer files; a released checkpoint may come without them: copy the tokenizer, "
            "preprocessor and chat-template files of its base model (e.g. Qwen2-VL-7B-Instruct) into it"
        )
    with quiet_transformers():
        processor = AutoProcessor.from_pretrained(path)
        if image_backend:
            processor.image_processor = AutoImageProcessor.from_pretrained(path, backend=image_backend)
    processor.tokenizer.padding_side = "right"
    if min_pixels is not None and max_pixels is not None:
        processor.image_processor.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    return processor
