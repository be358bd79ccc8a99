"""What the benchmarks' transformers / PEFT peers share: the `transformers.LlamaConfig` of a mixie
`LlamaConfig`, and the PEFT target-module names of mixie's projections.

Imported by the bench scripts (their directory is on `sys.path`); transformers and mixie.interop.peft are
imported only when called, so a script that needs neither stays within what the GPU machine has.
"""

from __future__ import annotations


def hf_llama_config(cfg, **overrides):
  """`transformers.LlamaConfig` of the same architecture as mixie's `cfg` (SDPA attention); keyword
  arguments replace fields."""
  import transformers

  kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
            rms_norm_eps=cfg.rms_eps, tie_word_embeddings=cfg.tie_embeddings,
            max_position_embeddings=cfg.max_seq_len, attn_implementation="sdpa")
  kw.update(overrides)
  return transformers.LlamaConfig(**kw)


def peft_targets(targets) -> list[str]:
  """PEFT `target_modules` (e.g. "q_proj") of mixie projection names (e.g. "q")."""
  from mixie.interop.peft import HF_MODULE

  return [HF_MODULE[p].split(".")[1] for p in targets]
