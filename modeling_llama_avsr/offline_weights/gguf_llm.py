"""GGUF causal LM (e.g. SmolLM2-135M-Instruct Q4_1) -> a plain dense float32 transformers model directory.

transformers reads GGUF itself (`from_pretrained(folder, gguf_file=name)`, needs the `gguf` package). By default the
loaded model stays flagged as GGUF-quantized, and then `save_pretrained`, PEFT and Trainer refuse it. Loading with
`GgufConfig(dequantize=True)` unpacks every block into ordinary float tensors and leaves no quantizer behind, so the
result saves as safetensors and reloads in a fraction of a second afterwards.
"""

import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def load_gguf_llm(gguf_file, dtype=torch.float32):
    """Load a GGUF causal LM dense (dequantized) and its tokenizer from the same file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_file}")
    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, quantization_config=GgufConfig(dequantize=True), dtype=dtype
    )
    if getattr(model, "hf_quantizer", None) is not None or getattr(model.config, "quantization_config", None):
        raise RuntimeError(f"{gguf_file}: model still flagged as quantized after dequantize=True")
    # The GGUF's own special ids (SmolLM2: BOS <|im_start|> 1, EOS = pad <|im_end|> 2); the tokenizer adds no BOS
    # by itself, which our processor handles by always inserting one.
    generation = model.generation_config
    generation.bos_token_id, generation.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return model.eval(), tokenizer


def convert_gguf_llm(gguf_file, output_dir) -> Path:
    """Write model (safetensors), tokenizer (with chat template) and generation config to `output_dir`."""
    model, tokenizer = load_gguf_llm(gguf_file)
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    logger.info(
        "saved %s (%d layers, hidden %d, %.1f M parameters) to %s",
        type(model).__name__,
        model.config.num_hidden_layers,
        model.config.hidden_size,
        model.num_parameters() / 1e6,
        output_dir,
    )
    return output_dir


__all__ = ["load_gguf_llm", "convert_gguf_llm"]
