"""Shared check of the parity tests: greedy decoding of ours against transformers' `generate`."""

from __future__ import annotations

import numpy as np
import torch

from mixie.model import generate as gen


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
