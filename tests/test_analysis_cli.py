"""`llama-avsr analyze` on a saved LlamaAVSR folder, reading LRS2/LRS3 through the package's own loaders (trees built
from the synthetic corpus, as in test_lrs.py)."""

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("espeakng_loader")
pytest.importorskip("av")
pytest.importorskip("decord")

sys.path.insert(0, str(Path(__file__).parent))
import make_trees  # noqa: E402

from modeling_llama_avsr import LlamaAVSRForConditionalGeneration  # noqa: E402
from modeling_llama_avsr.analysis import add_analyze_arguments, run_analyze  # noqa: E402

from tiny import WORDS, tiny_config, tiny_processor  # noqa: E402


def _word_tokenizer(rows):
    """tiny.tiny_tokenizer's word-level tokenizer, with the corpus's words too."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(WORDS) | {w for row in rows for w in ",".join(row[4:]).split()})
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *words])}, "<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_analyze_reads_lrs(tmp_path, capsys):
    # LRS3 after auto_avsr's preprocessing (mouth crops), the model's real input; load_lrs's layouts are test_lrs.py's.
    dataset = "lrs3"
    corpus = make_trees.tiny_corpus(tmp_path / "corpus", num_test=2)
    root = tmp_path / dataset
    rows = make_trees.make_auto_avsr(corpus, root, dataset, {"test": 2})["test"]
    torch.manual_seed(0)
    tokenizer = _word_tokenizer(make_trees.corpus_rows(corpus, "test"))
    config = tiny_config("avsr", tokenizer=tokenizer)
    LlamaAVSRForConditionalGeneration(config).save_pretrained(tmp_path / "model")
    tiny_processor("avsr", config.audio_compression_rate, config.video_compression_rate,
                   tokenizer).save_pretrained(tmp_path / "model")
    parser = argparse.ArgumentParser()
    add_analyze_arguments(parser)
    args = parser.parse_args(["--model", str(tmp_path / "model"), "--dataset", dataset, "--data", str(root),
                              "--split", "test", "--num-samples", "2", "--out", str(tmp_path / "out"),
                              "--no-interventions"])
    assert run_analyze(args) == 0
    assert "BOS sink" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    types = report["token_types"]
    assert types[0] == "BOS" and types.count("audio marker") == 2 and types.count("video marker") == 2
    assert "transcript" in types and len(report["batch"]["sinks"]["samples"]) == 2
    # The transcript is the first clip of the tree's split, read back through load_lrs (one token per word, + EOS).
    text = ",".join(rows[0][4:])
    assert types.count("transcript") == len(text.split()) + 1
