"""Attention sinks, massive activations and BOS alignment of a model, as in Sec. 3 of "Mitigating Attention Sinks and
Massive Activations in AVSR with LLMs": a JSON report, the paper's figures and a markdown summary.

    # a fine-tuned LlamaAVSR folder on the synthetic corpus
    python examples/analyze_sinks.py --model runs/avsr --data corpus --num-samples 4 --out analysis/avsr
    # any causal LM (folder or offline name) on a text: SmolLM2's BOS sink and feature 507
    python examples/analyze_sinks.py --model smollm2-135m --out analysis/smollm2
    # an untrained ASR model composed from SmolLM2 and Whisper tiny.en, on a synthesised sentence (needs espeak-ng)
    python examples/analyze_sinks.py --compose --out analysis/asr-untrained

Same as `llama-avsr analyze`, plus --compose.
"""

import argparse
import logging
import sys

from modeling_llama_avsr.analysis import add_analyze_arguments, analyze, run_analyze, summary_markdown


def run_composed(args) -> int:
    """LlamaAVSR (ASR) from the offline SmolLM2 and Whisper tiny.en with an untrained projector: the sequence layout
    and token types of the real model, on real LLM weights."""
    import torch

    from modeling_llama_avsr import LlamaAVSRForConditionalGeneration, LlamaAVSRProcessor
    from modeling_llama_avsr.analysis import processor_token_types
    from modeling_llama_avsr.data.tts import synthesize

    components = dict(text_model="smollm2-135m", audio_encoder="whisper-tiny.en", modality="asr",
                      audio_compression_rate=4)
    torch.manual_seed(0)  # the untrained projector and LoRA: the same model every run
    model = LlamaAVSRForConditionalGeneration.from_components(**components).eval()
    processor = LlamaAVSRProcessor.from_components(**components, audio_window="trimmed")
    sentence = args.text or "place blue at f two now"
    batch = processor(audio=[synthesize(sentence).audio], text=[sentence])
    types = processor_token_types(processor, batch)
    tokens = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    report = analyze(model, dict(batch), types=types, out_dir=args.out, tokens=tokens, threshold=args.threshold,
                     tau=args.tau, interventions=not args.no_interventions, figure_layer=args.figure_layer,
                     min_queries=args.min_queries, eq8_toward=args.eq8_toward)
    print(summary_markdown(report), end="")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_analyze_arguments(parser)
    parser.add_argument("--compose", action="store_true",
                        help="ignore --model: compose an untrained ASR LlamaAVSR from SmolLM2 + Whisper tiny.en")
    argv = sys.argv[1:] if argv is None else argv
    if "--compose" in argv and "--model" not in argv:
        argv = [*argv, "--model", "smollm2-135m"]
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_composed(args) if args.compose else run_analyze(args)


if __name__ == "__main__":
    sys.exit(main())
