"""AV-HuBERT fairseq checkpoints (`base_vox_iter5.pt`, `large_vox_iter5.pt`, fine-tuned ones) -> `AVHubertModel`.

    model = convert_avhubert_fairseq("large_vox_iter5.pt", "avhubert-large")   # also saves the folder

A fairseq checkpoint is a torch pickle holding, next to the weights, the training configuration as argparse
`Namespace`, omegaconf `DictConfig` or dataclass objects. `torch.load(weights_only=True)` refuses those, and a plain
`torch.load` would run whatever the pickle asks for. `load_fairseq_checkpoint` reads it with torch's own loader and
`RestrictedUnpickler`, which builds no arbitrary object: tensors and storages are rebuilt by torch's functions,
plain containers are real, and every other class becomes an inert `PickledObject` that only records the arguments
and state the pickle gives it (so the configuration can still be read). A global that is not a class (a function
such as `os.system`, `builtins.eval` or `subprocess.call`) is refused with `UnsafeCheckpointError`.

Key mapping (see `modeling_avhubert`): identical names except the weight-normalised positional convolution
(`weight_g` / `weight_v` -> parametrizations), the pretraining-only tensors (dropped) and, for fine-tuned
`AVHubertSeq2Seq` checkpoints, the `encoder.w2v_model.` prefix (stripped; the decoder is dropped).
"""

import _compat_pickle
import logging
import pickle
import types
from pathlib import Path

import torch

from ..configuration_avhubert import AVHubertConfig
from ..modeling_avhubert import AVHubertModel

logger = logging.getLogger(__name__)

FINETUNED_PREFIX = "encoder.w2v_model."
PRETRAINING_ONLY = ("mask_emb", "label_embs_concat", "final_proj.")
POS_CONV = "encoder.pos_conv.0."

# Globals that are real: torch's tensor rebuilding and harmless value types. Storages are resolved by torch's own
# unpickler wrapper before `find_class` is reached.
_ALLOWED = {
    ("collections", "OrderedDict"),
    ("torch", "Size"),
    ("torch", "Tensor"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch.nn.parameter", "Parameter"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "complex"),
    ("builtins", "bytearray"),
    ("_codecs", "encode"),  # how protocol-2 pickles write bytes
} | {("builtins", name) for name in ("dict", "list", "tuple", "int", "float", "str", "bool", "bytes", "object")}
_ALLOWED_TORCH_REBUILDS = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter",
                           "_rebuild_parameter_with_state", "_rebuild_device_tensor_from_numpy")
# Lower-case names that are classes or value constructors in practice (numpy scalars in fairseq's extra state,
# dtype objects): they become placeholders too, never called.
_PLACEHOLDER_FUNCTIONS = {
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
}
# Nothing from these is ever resolved, not even as an inert placeholder: a checkpoint has no business naming them.
_REFUSED_MODULES = {"os", "posix", "nt", "subprocess", "sys", "builtins", "shutil", "socket", "importlib", "runpy",
                    "pty", "ctypes", "pickle", "code", "codeop", "io", "pathlib", "tempfile", "webbrowser",
                    "multiprocessing", "signal", "functools", "operator", "types", "inspect", "marshal"}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The pickle asks to call something other than a tensor-rebuilding function or a class constructor."""


class PickledObject:
    """Stand-in for an object of a class we do not import. It records what the pickle gives it and runs nothing."""

    _pickled_module = _pickled_name = None

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state, self.items = args, kwargs, None, []

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):  # dict subclasses are pickled with SETITEMS
        self.items.append((key, value))

    def append(self, value):  # list subclasses with APPENDS
        self.items.append(value)

    def extend(self, values):
        self.items.extend(values)

    def __repr__(self):
        return f"<pickled {self._pickled_module}.{self._pickled_name}>"


def _reconstructor(cls, base, state):
    # copyreg._reconstructor(cls, object, None) is how protocol < 2 pickles rebuild plain class instances.
    if not (isinstance(cls, type) and issubclass(cls, PickledObject)):
        raise UnsafeCheckpointError(f"copyreg._reconstructor of {cls!r} is not allowed")
    return cls()


class RestrictedUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` that resolves only the globals above; classes become `PickledObject` subclasses."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._placeholders = {}  # one stand-in class per (module, name) of this load

    def find_class(self, module, name):
        # Protocol-2 pickles (torch.save's default) name Python 2 modules: __builtin__, copy_reg, ...
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch._utils" and name in _ALLOWED_TORCH_REBUILDS:
            return super().find_class(module, name)
        if (module, name) == ("copyreg", "_reconstructor"):
            return _reconstructor
        refused = module.split(".")[0] in _REFUSED_MODULES
        if not refused and ((module, name) in _PLACEHOLDER_FUNCTIONS or name[:1].isupper()):
            # A class by convention: its instances are only ever recorded (its code is never imported or run).
            key = (module, name)
            if key not in self._placeholders:
                self._placeholders[key] = type(name, (PickledObject,), {"_pickled_module": module,
                                                                          "_pickled_name": name})
            return self._placeholders[key]
        raise UnsafeCheckpointError(
            f"the checkpoint refers to {module}.{name}, which is neither a tensor-rebuilding function nor a "
            "configuration class; refusing to load it (a pickle that calls functions can run any code)"
        )


# torch.load(pickle_module=...) needs a module-like object with Unpickler and load (the legacy format uses load).
restricted_pickle = types.ModuleType("restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler
restricted_pickle.load = lambda file, **kwargs: RestrictedUnpickler(file, **kwargs).load()
restricted_pickle.__name__ = "restricted_pickle"


def to_plain(value):
    """Placeholders (argparse Namespace, omegaconf DictConfig/ListConfig and their nodes, dataclasses) -> plain
    dicts, lists and values, so a configuration can be read with `.get`."""
    if isinstance(value, PickledObject):
        state = value.state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}  # (dict state, slot state)
        if isinstance(state, dict) and "_content" in state:  # omegaconf containers
            return to_plain(state["_content"])
        if isinstance(state, dict) and "_val" in state:  # omegaconf value nodes
            return to_plain(state["_val"])
        if isinstance(state, dict):  # Namespace, dataclasses: their __dict__
            return {k: to_plain(v) for k, v in state.items() if not k.startswith("_")}
        if value.items:
            return [to_plain(v) for v in value.items]
        return repr(value)
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_plain(v) for v in value)
    return value


def load_fairseq_checkpoint(path) -> dict:
    """Read a fairseq checkpoint safely. Returns {"model": state dict, "cfg": plain dict or None, "args": plain
    dict or None}; raises `UnsafeCheckpointError` for a pickle that tries to call functions."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", pickle_module=restricted_pickle, weights_only=False)
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"{path}: {e}") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise ValueError(f"{path}: not a fairseq checkpoint (expected a dict with a 'model' state dict)")
    return {"model": checkpoint["model"], "cfg": to_plain(checkpoint.get("cfg")), "args": to_plain(checkpoint.get("args"))}


def _model_settings(checkpoint: dict) -> dict:
    """fairseq's model options: `cfg["model"]` (hydra era), or the flat `args` Namespace (older checkpoints). A
    fine-tuned checkpoint nests the pretrained encoder's options under `w2v_args`."""
    cfg = checkpoint.get("cfg") or {}
    settings = cfg.get("model") if isinstance(cfg, dict) else None
    if not isinstance(settings, dict):
        settings = checkpoint.get("args") if isinstance(checkpoint.get("args"), dict) else {}
    nested = settings.get("w2v_args")
    if isinstance(nested, dict):
        settings = nested.get("model", nested)
    return settings


def avhubert_config_from_fairseq(checkpoint: dict) -> AVHubertConfig:
    """The config from the tensor shapes (sizes) and fairseq's options (what shapes cannot tell)."""
    state = fairseq_encoder_state(checkpoint["model"], rename=False)
    settings = _model_settings(checkpoint)
    hidden = state["encoder.layer_norm.weight"].shape[0]
    num_layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layers."))
    trunk = "feature_extractor_video.resnet.trunk."
    stages = sorted({int(k[len(trunk) + 5]) for k in state if k.startswith(trunk + "layer")})
    conv_v = state[POS_CONV + "weight_v"]
    heads = settings.get("encoder_attention_heads") or {768: 12, 1024: 16}.get(hidden)
    if heads is None:
        raise ValueError("the checkpoint does not say encoder_attention_heads, and its width is neither 768 nor 1024")
    values = dict(
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        intermediate_size=state["encoder.layers.0.fc1.weight"].shape[0],
        conv_pos=conv_v.shape[2],
        conv_pos_groups=hidden // conv_v.shape[1],
        resnet_frontend_channels=state["feature_extractor_video.resnet.frontend3D.0.weight"].shape[0],
        resnet_layers=[
            1 + max(int(k.split(".")[4]) for k in state if k.startswith(f"{trunk}layer{s}.")) for s in stages
        ],
        resnet_channels=[state[f"{trunk}layer{s}.0.conv1.weight"].shape[0] for s in stages],
        resnet_relu_type="prelu" if "feature_extractor_video.resnet.frontend3D.2.weight" in state else "relu",
        modality_fusion="concat" if "post_extract_proj.weight" in state else "add",
        audio_feat_dim=state["feature_extractor_audio.proj.weight"].shape[1],
    )
    for ours, theirs in (("layer_norm_first", "layer_norm_first"), ("hidden_dropout", "dropout"),
                         ("attention_dropout", "attention_dropout"), ("activation_dropout", "activation_dropout"),
                         ("feat_proj_dropout", "dropout_input"), ("layerdrop", "encoder_layerdrop")):
        if settings.get(theirs) is not None:
            values[ours] = settings[theirs]
    if settings.get("activation_fn") not in (None, "gelu"):
        raise ValueError(f"activation_fn={settings['activation_fn']!r} is not supported (AV-HuBERT uses gelu)")
    return AVHubertConfig(**values)


def fairseq_encoder_state(state_dict: dict, rename: bool = True) -> dict:
    """fairseq AV-HuBERT (pretrained or fine-tuned) state dict -> `AVHubertModel` keys (or fairseq's, `rename=False`)."""
    if any(k.startswith(FINETUNED_PREFIX) for k in state_dict):
        state_dict = {k[len(FINETUNED_PREFIX):]: v for k, v in state_dict.items() if k.startswith(FINETUNED_PREFIX)}
    state = {k: v for k, v in state_dict.items() if not k.startswith(PRETRAINING_ONLY)}
    if rename:
        for fairseq_name, ours in (("weight_g", "original0"), ("weight_v", "original1")):
            if POS_CONV + fairseq_name in state:
                state[POS_CONV + "parametrizations.weight." + ours] = state.pop(POS_CONV + fairseq_name)
    return state


def convert_avhubert_fairseq(checkpoint_path, output_dir=None) -> AVHubertModel:
    """Load a fairseq AV-HuBERT checkpoint into `AVHubertModel` (every encoder weight must fit exactly); saved to
    `output_dir` with `save_pretrained` when given."""
    checkpoint = load_fairseq_checkpoint(checkpoint_path)
    config = avhubert_config_from_fairseq(checkpoint)
    model = AVHubertModel(config)
    missing, unexpected = model.load_state_dict(fairseq_encoder_state(checkpoint["model"]), strict=False)
    if missing or unexpected:
        raise ValueError(f"{checkpoint_path}: weights do not fit AVHubertModel: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.eval()
    logger.info("%s: AV-HuBERT with %d layers, d=%d", checkpoint_path, config.num_hidden_layers, config.hidden_size)
    if output_dir is not None:
        model.save_pretrained(output_dir)
    return model


__all__ = [
    "PickledObject",
    "RestrictedUnpickler",
    "UnsafeCheckpointError",
    "avhubert_config_from_fairseq",
    "convert_avhubert_fairseq",
    "fairseq_encoder_state",
    "load_fairseq_checkpoint",
]
