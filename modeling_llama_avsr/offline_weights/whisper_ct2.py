"""Whisper in CTranslate2 format -> transformers `WhisperForConditionalGeneration`.

The offline Whisper packages ship CTranslate2's `model.bin`. Its layout (CTranslate2
`python/ctranslate2/specs/model_spec.py`, `ModelSpec._serialize`, binary version 6), all little-endian:

    u32 version | str spec_name | u32 spec_revision | u32 n_variables
    n_variables x (str name | u8 rank | rank x u32 dim | u8 dtype_id | u32 n_bytes | n_bytes raw data)
    u32 n_aliases | n_aliases x (str alias | str target)

where `str` is a u16 length (counting a trailing NUL) followed by the UTF-8 bytes and the NUL. Variables come sorted
by name; a variable equal to an earlier one is stored once and the later name becomes an alias (Whisper's decoder
output projection aliases the decoder embeddings). We read it with struct + numpy: no ctranslate2 at run time.
"""

import json
import logging
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

SUPPORTED_BINARY_VERSIONS = (6,)
# Order of CTranslate2's DataType enum (include/ctranslate2/types.h). bfloat16 has no numpy dtype: read as uint16.
_DTYPES = (np.float32, np.int8, np.int16, np.int32, np.float16, np.uint16)
_BFLOAT16 = 5
# CTranslate2's ActivationType enum value for exact (erf) GELU, the one Whisper uses.
_GELU = 3
# Every released Whisper size uses 64-dimensional attention heads; only needed if a file lacks `*/num_heads`.
_WHISPER_HEAD_DIM = 64


class CT2FormatError(ValueError):
    """A CTranslate2 model file is missing, truncated, corrupt or not the kind of model we can convert."""


@dataclass
class CT2Model:
    spec_name: str
    revision: int
    variables: dict  # name -> np.ndarray, as stored (float16 for our packages); aliases resolved to the same array
    aliases: dict  # alias name -> target name


def _read_bytes(paths: Sequence[Path]) -> memoryview:
    # A model split over several files (pip packages have a size cap) is simply the concatenation of its parts.
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise CT2FormatError(f"CTranslate2 model part file(s) not found: {', '.join(missing)}")
    buf = bytearray()  # writable, so that the arrays parsed from it are writable views rather than copies
    for path in paths:
        buf += Path(path).read_bytes()
    return memoryview(buf)


def read_ct2_model(paths) -> CT2Model:
    """Parse a CTranslate2 `model.bin` (a path, or a list of part files to concatenate in order)."""
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    label = " + ".join(str(p) for p in paths)
    buf = _read_bytes(paths)
    offset = 0

    def take(n):
        nonlocal offset
        if offset + n > len(buf):
            raise CT2FormatError(
                f"{label}: truncated or corrupt CTranslate2 model (needs {offset + n} bytes, file has {len(buf)})"
            )
        chunk = buf[offset : offset + n]
        offset += n
        return chunk

    def u(fmt):
        return struct.unpack("<" + fmt, take(struct.calcsize(fmt)))[0]

    def string():
        raw = take(u("H"))
        if not raw or raw[-1] != 0:
            raise CT2FormatError(f"{label}: corrupt CTranslate2 model (string at byte {offset} is not NUL-ended)")
        try:
            return bytes(raw[:-1]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise CT2FormatError(f"{label}: corrupt CTranslate2 model (bad string at byte {offset})") from e

    version = u("I")
    if version not in SUPPORTED_BINARY_VERSIONS:
        raise CT2FormatError(
            f"{label}: not a CTranslate2 model of a supported binary version (header says {version}, "
            f"supported: {SUPPORTED_BINARY_VERSIONS})"
        )
    spec_name, revision = string(), u("I")

    variables = {}
    for _ in range(u("I")):
        name = string()
        rank = u("B")
        shape = tuple(u("I") for _ in range(rank))
        dtype_id, n_bytes = u("B"), u("I")
        if dtype_id >= len(_DTYPES):
            raise CT2FormatError(f"{label}: corrupt CTranslate2 model (variable {name!r} has dtype id {dtype_id})")
        dtype = np.dtype(_DTYPES[dtype_id])
        if n_bytes != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise CT2FormatError(f"{label}: corrupt CTranslate2 model (variable {name!r}: {n_bytes} bytes for {shape})")
        array = np.frombuffer(take(n_bytes), dtype=dtype).reshape(shape)
        if dtype_id == _BFLOAT16:
            array = (array.astype(np.uint32) << 16).view(np.float32)
        variables[name] = array

    aliases = {}
    for _ in range(u("I")):
        alias, target = string(), string()
        if target not in variables:
            raise CT2FormatError(f"{label}: corrupt CTranslate2 model (alias {alias!r} -> unknown {target!r})")
        aliases[alias] = target
        variables[alias] = variables[target]

    if offset != len(buf):
        raise CT2FormatError(f"{label}: corrupt CTranslate2 model ({len(buf) - offset} unexpected trailing bytes)")
    logger.info("read %s: %s rev %d, %d variables, %d aliases", label, spec_name, revision, len(variables), len(aliases))
    return CT2Model(spec_name, revision, variables, aliases)


def _scalar(ct2: CT2Model, name: str, default):
    return int(ct2.variables[name]) if name in ct2.variables else default


def _count_layers(ct2: CT2Model, stack: str) -> int:
    pattern = re.compile(rf"{stack}/layer_(\d+)/")
    return 1 + max((int(m.group(1)) for n in ct2.variables if (m := pattern.match(n))), default=-1)


def whisper_config_from_ct2(ct2: CT2Model, **config_overrides):
    """Infer a `WhisperConfig` from the tensor shapes. Heads come from the file's `encoder/num_heads` and
    `decoder/num_heads` scalars; older files without them fall back to d_model / 64 (true of every Whisper size)."""
    from transformers import WhisperConfig

    if ct2.spec_name != "WhisperSpec":
        raise CT2FormatError(f"expected a CTranslate2 WhisperSpec model, got {ct2.spec_name!r}")
    v = ct2.variables
    for name, expected in (("decoder/pre_norm", 1), ("decoder/activation", _GELU), ("decoder/scale_embeddings", 0)):
        if _scalar(ct2, name, expected) != expected:
            raise CT2FormatError(f"unsupported Whisper variant: {name} = {int(v[name])}, expected {expected}")
    try:
        d_model, n_mels, _ = v["encoder/conv1/weight"].shape
        vocab_size = v["decoder/embeddings/weight"].shape[0]
        ffn_dim = v["encoder/layer_0/ffn/linear_0/weight"].shape[0]
        max_source_positions = v["encoder/position_encodings/encodings"].shape[0]
        max_target_positions = v["decoder/position_encodings/encodings"].shape[0]
    except KeyError as e:
        raise CT2FormatError(f"not a Whisper CTranslate2 model: missing variable {e}") from e
    return WhisperConfig(
        vocab_size=vocab_size,
        num_mel_bins=n_mels,
        d_model=d_model,
        encoder_layers=_count_layers(ct2, "encoder"),
        decoder_layers=_count_layers(ct2, "decoder"),
        encoder_attention_heads=_scalar(ct2, "encoder/num_heads", d_model // _WHISPER_HEAD_DIM),
        decoder_attention_heads=_scalar(ct2, "decoder/num_heads", d_model // _WHISPER_HEAD_DIM),
        encoder_ffn_dim=ffn_dim,
        decoder_ffn_dim=v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=max_source_positions,  # 1500: 30 s of audio after the stride-2 conv
        max_target_positions=max_target_positions,  # 448
        activation_function="gelu",
        scale_embedding=False,
        tie_word_embeddings="decoder/projection/weight" not in v or "decoder/projection/weight" in ct2.aliases,
        # WhisperConfig's default special ids are tiny.en's; the real ones come from the tokenizer (see
        # convert_whisper_ct2), so default to none rather than to ids that may not exist in this vocabulary.
        **{"pad_token_id": None, "bos_token_id": None, "eos_token_id": None,
           "suppress_tokens": None, "begin_suppress_tokens": None, **config_overrides},
    )


def whisper_state_dict_from_ct2(ct2: CT2Model) -> dict:
    """Map CTranslate2 Whisper variables to transformers names, as float32 tensors."""
    v = ct2.variables

    def get(name):
        if name not in v:
            raise CT2FormatError(f"Whisper CTranslate2 model lacks variable {name!r}")
        if v[name].dtype == np.int8:
            raise CT2FormatError(f"{name} is int8-quantized; only float CTranslate2 models can be converted")
        return torch.from_numpy(v[name].astype(np.float32))

    sd = {}

    def linear(hf, ct):
        sd[f"{hf}.weight"], sd[f"{hf}.bias"] = get(f"{ct}/weight"), get(f"{ct}/bias")

    def norm(hf, ct):
        sd[f"{hf}.weight"], sd[f"{hf}.bias"] = get(f"{ct}/gamma"), get(f"{ct}/beta")

    def fused(hf, ct, names):
        # Fused projections split along the output dim. HF's k_proj has no bias: a key bias adds the same q.b_k to
        # every logit of a query, which softmax cancels, so dropping it is exact (CTranslate2 stores zeros there).
        weights, biases = get(f"{ct}/weight").chunk(len(names)), get(f"{ct}/bias").chunk(len(names))
        for proj, w, b in zip(names, weights, biases):
            sd[f"{hf}.{proj}.weight"] = w.clone()
            if proj != "k_proj":
                sd[f"{hf}.{proj}.bias"] = b.clone()

    def block(hf, ct, cross):
        fused(f"{hf}.self_attn", f"{ct}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
        linear(f"{hf}.self_attn.out_proj", f"{ct}/self_attention/linear_1")
        norm(f"{hf}.self_attn_layer_norm", f"{ct}/self_attention/layer_norm")
        if cross:
            linear(f"{hf}.encoder_attn.q_proj", f"{ct}/attention/linear_0")
            fused(f"{hf}.encoder_attn", f"{ct}/attention/linear_1", ("k_proj", "v_proj"))
            linear(f"{hf}.encoder_attn.out_proj", f"{ct}/attention/linear_2")
            norm(f"{hf}.encoder_attn_layer_norm", f"{ct}/attention/layer_norm")
        linear(f"{hf}.fc1", f"{ct}/ffn/linear_0")
        linear(f"{hf}.fc2", f"{ct}/ffn/linear_1")
        norm(f"{hf}.final_layer_norm", f"{ct}/ffn/layer_norm")

    linear("model.encoder.conv1", "encoder/conv1")
    linear("model.encoder.conv2", "encoder/conv2")
    sd["model.encoder.embed_positions.weight"] = get("encoder/position_encodings/encodings")
    for i in range(_count_layers(ct2, "encoder")):
        block(f"model.encoder.layers.{i}", f"encoder/layer_{i}", cross=False)
    norm("model.encoder.layer_norm", "encoder/layer_norm")

    sd["model.decoder.embed_tokens.weight"] = get("decoder/embeddings/weight")
    sd["model.decoder.embed_positions.weight"] = get("decoder/position_encodings/encodings")
    for i in range(_count_layers(ct2, "decoder")):
        block(f"model.decoder.layers.{i}", f"decoder/layer_{i}", cross=True)
    norm("model.decoder.layer_norm", "decoder/layer_norm")
    if "decoder/projection/weight" in v and "decoder/projection/weight" not in ct2.aliases:
        sd["proj_out.weight"] = get("decoder/projection/weight")
    return sd


def whisper_from_ct2(ct2: CT2Model, **config_overrides):
    """Build a float32 `WhisperForConditionalGeneration` holding exactly the CTranslate2 weights."""
    from transformers import WhisperForConditionalGeneration

    config = whisper_config_from_ct2(ct2, **config_overrides)
    state_dict = whisper_state_dict_from_ct2(ct2)
    with torch.device("meta"):  # skip the random init: every weight is assigned below
        model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    missing = [k for k in missing if not (k == "proj_out.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise CT2FormatError(f"Whisper weight mapping mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise CT2FormatError(f"Whisper weights left unset after conversion: {leftover}")
    return model.eval()


def _whisper_tokenizer(tokenizer_file: Path, vocabulary_file: Path | None, vocab_size: int):
    from tokenizers import AddedToken
    from transformers import WhisperTokenizer

    tokenizer = WhisperTokenizer(tokenizer_file=str(tokenizer_file))
    # CTranslate2's tokenizer.json stops at <|notimestamps|>; the 1501 timestamp tokens <|0.00|>..<|30.00|> that
    # fill the rest of the model's vocabulary are only in vocabulary.txt (one token per line, line = id).
    if vocabulary_file is not None and Path(vocabulary_file).is_file():
        vocab = Path(vocabulary_file).read_text(encoding="utf-8").split("\n")[:vocab_size]
        extra = vocab[len(tokenizer) :]
        tokenizer.add_tokens([AddedToken(t, lstrip=False, rstrip=False, normalized=False) for t in extra])
        if len(tokenizer) != vocab_size or tokenizer.convert_tokens_to_ids(vocab[-1]) != vocab_size - 1:
            raise CT2FormatError(f"{vocabulary_file} does not match {tokenizer_file} and the model's vocabulary")
    return tokenizer


def _whisper_generation_config(config, tokenizer, ct2_config: dict):
    from transformers import GenerationConfig
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    ids = tokenizer.convert_tokens_to_ids
    # openai-whisper's own rule: the multilingual vocabulary has 51865+ entries, the English-only one 51864.
    multilingual = config.vocab_size >= 51865
    generation = GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        max_length=config.max_target_positions,
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin", [ids("Ġ"), config.eos_token_id]),
        suppress_tokens=ct2_config.get("suppress_ids", []),
        alignment_heads=ct2_config.get("alignment_heads"),
        no_timestamps_token_id=ids("<|notimestamps|>"),
        prev_sot_token_id=ids("<|startofprev|>"),
        max_initial_timestamp_index=50,
        is_multilingual=multilingual,
        return_timestamps=False,
    )
    if multilingual:
        # English-only models must not get these maps: with them HF inserts a language token they never saw.
        generation.lang_to_id = {f"<|{c}|>": ids(f"<|{c}|>") for c in LANGUAGES if f"<|{c}|>" in tokenizer.get_vocab()}
        generation.task_to_id = {task: ids(f"<|{task}|>") for task in ("translate", "transcribe")}
    return generation


def convert_whisper_ct2(model_files, output_dir, tokenizer_file, config_file=None, vocabulary_file=None) -> Path:
    """Convert a CTranslate2 Whisper (`model.bin`, or its parts in order) into a transformers model directory:
    float32 safetensors, config, generation config, `WhisperFeatureExtractor` and `WhisperTokenizer`."""
    from transformers import WhisperFeatureExtractor

    output_dir = Path(output_dir)
    ct2 = read_ct2_model(model_files)
    tokenizer = _whisper_tokenizer(Path(tokenizer_file), vocabulary_file, whisper_config_from_ct2(ct2).vocab_size)
    ids = tokenizer.convert_tokens_to_ids
    eot = ids("<|endoftext|>")
    model = whisper_from_ct2(
        ct2, decoder_start_token_id=ids("<|startoftranscript|>"), bos_token_id=eot, eos_token_id=eot, pad_token_id=eot
    )
    ct2_config = json.loads(Path(config_file).read_text()) if config_file else {}
    model.generation_config = generation = _whisper_generation_config(model.config, tokenizer, ct2_config)
    model.config.suppress_tokens = generation.suppress_tokens
    model.config.begin_suppress_tokens = generation.begin_suppress_tokens

    model.save_pretrained(output_dir)  # safetensors by default
    tokenizer.save_pretrained(output_dir)
    WhisperFeatureExtractor(feature_size=model.config.num_mel_bins).save_pretrained(output_dir)
    logger.info("saved Whisper (%d layers, d_model %d) to %s", model.config.encoder_layers, model.config.d_model, output_dir)
    return output_dir


__all__ = [
    "CT2FormatError",
    "CT2Model",
    "read_ct2_model",
    "whisper_config_from_ct2",
    "whisper_state_dict_from_ct2",
    "whisper_from_ct2",
    "convert_whisper_ct2",
]
