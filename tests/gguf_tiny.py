"""Write a tiny HF Llama checkpoint as a GGUF file (F32 tensors), for the GGUF loading test.

llama.cpp's converter is not a Python package, so this small writer uses the ``gguf`` package's own
metadata writer and tensor-name map. Two conventions of llama.cpp matter for a lossless round trip
through transformers' GGUF loader: the q/k projection rows are permuted (rotary halves interleaved),
and a byte-level BPE tokenizer is stored as ``tokenizer.ggml.model = "gpt2"`` with its merges.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for q/k: the inverse of what transformers undoes on load."""
    rows = weights.shape[0]
    return weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def write_gguf(hf_dir: str | Path, out_path: str | Path) -> Path:
    import gguf

    hf_dir, out_path = Path(hf_dir), Path(out_path)
    config = AutoConfig.from_pretrained(hf_dir)
    if config.model_type != "llama":
        raise ValueError(f"only Llama checkpoints, got {config.model_type!r}")
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tokenizer_json = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer_config = json.loads((hf_dir / "tokenizer_config.json").read_text(encoding="utf-8"))

    writer = gguf.GGUFWriter(str(out_path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]) if getattr(config, "rope_parameters", None)
                              else float(config.rope_theta))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    # tokenizer: byte-level BPE vocabulary in id order, its merges, special tokens as CONTROL
    vocab = tokenizer_json["model"]["vocab"]
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    specials = {added["content"] for added in tokenizer_json.get("added_tokens", []) if added.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer_json["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    for name, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                      ("unk_token", writer.add_unk_token_id), ("pad_token", writer.add_pad_token_id)):
        token = tokenizer_config.get(name)
        if isinstance(token, dict):
            token = token.get("content")
        if token is not None and token in vocab:
            add(vocab[token])
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = name_map.get_name(base)
        if gguf_name is None:
            continue  # buffers such as rotary inverse frequencies are recomputed on load
        data = tensor.detach().cpu().numpy().astype(np.float32)
        if gguf_name.endswith("attn_q"):
            data = _permute(data, config.num_attention_heads)
        elif gguf_name.endswith("attn_k"):
            data = _permute(data, config.num_key_value_heads)
        writer.add_tensor(f"{gguf_name}.{suffix}", np.ascontiguousarray(data))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path
