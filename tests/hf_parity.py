"""Shared pieces of the parity tests against transformers: a tiny random model of each family (saved by
transformers, loaded by mixie) and greedy decoding of ours against transformers' `generate`."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from mixie.model import checkpoint, generate as gen


def assert_greedy_matches_hf(hf_model, params, cfg, prompt_1t, variants, max_new: int = 20):
  """`max_new` greedy tokens of ours (one call per `generate` keyword set in `variants`, e.g. with and
  without the KV cache) equal transformers' greedy tokens for the same one-row prompt."""
  t = prompt_1t.shape[1]
  with torch.no_grad():
    ref = hf_model.generate(torch.as_tensor(prompt_1t), max_new_tokens=max_new, do_sample=False,
                            pad_token_id=0)[0, t:].numpy()
  for kw in variants:
    out, n = gen.generate(params, None, prompt_1t, np.array([t]), cfg, max_new=max_new, **kw)
    np.testing.assert_array_equal(np.asarray(out)[0], ref, err_msg=str(kw))
    assert int(n[0]) == max_new, kw


BASE = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, max_position_embeddings=128, rms_norm_eps=1e-6)
# family -> (transformers class, its config class, config fields, parameters redrawn ~ N(0, std) so that
# the family's feature matters). Windows (6) are shorter than the test sequences (24; 10 + 20 greedy).
ROWS = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(tie_word_embeddings=False), {}),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(tie_word_embeddings=False), {"_proj.bias": 0.5}),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(sliding_window=6, tie_word_embeddings=False), {}),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", dict(head_dim=24), {"norm.weight": 0.3}),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config",
               dict(num_hidden_layers=3, head_dim=24, sliding_window=6, query_pre_attn_scalar=20,
                    attn_logit_softcapping=2.0, final_logit_softcapping=0.3),
               {"norm.weight": 0.3, "q_proj.weight": 0.3, "k_proj.weight": 0.3}),
}


def hf_family_model(family, path):
  """A tiny random transformers model of `family` (eager attention, so HF applies windows and caps),
  saved to `path`, and mixie's load of it: `(hf_model, cfg, params)`."""
  cls, conf, fields, redraw = ROWS[family]
  torch.manual_seed(0)
  hf = getattr(transformers, cls)(getattr(transformers, conf)(**{**BASE, **fields},
                                                               attn_implementation="eager")).eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      for suffix, std in redraw.items():
        if name.endswith(suffix):
          p.normal_(0.0, std)
  hf.save_pretrained(path)
  cfg, params = checkpoint.load_hf(path)
  return hf, cfg, params


def write_gguf(hf_model, path, arch: str, extra=None):
  """`hf_model` as an f32 GGUF file of llama.cpp architecture `arch`, tensors named by gguf-py's own map
  (llama.cpp's table), rows as in HF (no Q/K permutation: what llama.cpp writes for Qwen2); `extra(writer)`
  adds more metadata (a tokenizer)."""
  import gguf

  c = hf_model.config
  w = gguf.GGUFWriter(str(path), arch)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_block_count(c.num_hidden_layers)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_vocab_size(c.vocab_size)
  if extra is not None:
    extra(w)
  names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], c.num_hidden_layers)
  for name, t in hf_model.state_dict().items():
    w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), t.float().numpy())
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
