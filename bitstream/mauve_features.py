"""Text features for MAUVE from any causal language model (spec §9.4, issue 10).

MAUVE (Pillutla et al., 2021) compares two text distributions in a feature space: each text is
embedded by a language model, the pooled embeddings are quantized by k-means, and MAUVE is the area
under the KL-divergence frontier of the two resulting histograms. ``mauve-text`` does the
quantization and the frontier; its built-in featurizer loads ``gpt2-large`` from the hub, which a
machine without hub access cannot do. So we embed the texts ourselves and hand ``mauve-text`` the
features (``compute_mauve(p_features=..., q_features=...)``).

The embedding follows the MAUVE paper's GPT-2 featurizer: the final layer's hidden state at the last
token of the (truncated) text. The featurizer is named by ``evaluation.mauve_featurizer``:

* ``judge`` — the run's own GenPPL judge (at CPU scale, the small GPT-2 trained on the run's corpus);
* anything else — a hub id or local ``save_pretrained`` directory for ``AutoModelForCausalLM``
  (``gpt2-large`` on a cluster, as in the paper).

Texts are tokenized without special tokens, cut to ``max_text_length`` tokens, and embedded in
right-padded batches (causal attention: the last real token never sees a pad). An empty text is
embedded as the featurizer's first pad/eos token so that it still counts.
"""

from __future__ import annotations

import numpy as np

JUDGE = "judge"


def load_featurizer(name: str, scorer=None, device=None):
    """(model, tokenizer, pad_id, name) for ``name`` (see the module docstring)."""
    if name == JUDGE:
        if scorer is None:
            raise ValueError("evaluation.mauve_featurizer: 'judge' needs the run's judge")
        return scorer.model, scorer.tokenizer, scorer.pad_id, f"judge:{scorer.name}"
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    except OSError as err:
        raise FileNotFoundError(f"evaluation.mauve_featurizer {name!r}: cannot load it ({err}); offline, use "
                                f"'judge' or a local save_pretrained directory") from err
    model.to(device or "cpu").eval()
    pad = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    return model, tokenizer, int(pad), name


def featurize(texts, model, tokenizer, pad_id: int, max_text_length: int, batch_size: int = 16) -> np.ndarray:
    """[n_texts, hidden] float32: the last layer's hidden state at each text's last token."""
    import torch

    device = next(model.parameters()).device
    limit = int(max_text_length)
    positions = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if positions:
        limit = min(limit, int(positions))
    ids = [list(x)[:limit] or [pad_id] for x in tokenizer(list(map(str, texts)), add_special_tokens=False)["input_ids"]]
    out = []
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            chunk = ids[start:start + batch_size]
            longest = max(len(x) for x in chunk)
            x = torch.full((len(chunk), longest), pad_id, dtype=torch.long)
            mask = torch.zeros_like(x)
            for r, row in enumerate(chunk):
                x[r, :len(row)] = torch.as_tensor(row)
                mask[r, :len(row)] = 1
            hidden = model(input_ids=x.to(device), attention_mask=mask.to(device),
                           output_hidden_states=True).hidden_states[-1]
            last = torch.as_tensor([len(row) - 1 for row in chunk], device=device)
            out.append(hidden[torch.arange(len(chunk), device=device), last].float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)
