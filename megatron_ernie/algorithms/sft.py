"""SFT: batches of packed chat samples, loss = token NLL on assistant tokens only.

Its batch producer is the chat dataset (`data/sft.py`); its loss is the training step's masked
token loss. Packed sequences carry `doc_ids`: attention is made block-causal per document here
(on the local spec, as an explicit mask), positions already restart per document.
"""
from __future__ import annotations

from functools import partial

from megatron_ernie.training.step import masked_token_loss


def build_tokenizer(cfg):
    """The run's tokenizer: `data.tokenizer`, else the HF model dir we start from, else the demo one."""
    from pathlib import Path

    from megatron_ernie.data.tokenizer import demo_tokenizer, load_tokenizer

    if cfg.data.tokenizer:
        return load_tokenizer(cfg.data.tokenizer)
    init = cfg.model.init_from
    for candidate in ([Path(init), Path(init) / "hf"] if init else []):  # HF dir, or a converted checkpoint's copy
        if (candidate / "tokenizer_config.json").exists():
            return load_tokenizer(candidate)
    return demo_tokenizer()


def build_dataset(cfg, tokenizer):
    from megatron_ernie.data.sft import SFTDataset, bundled_sft_path

    paths = [p.strip() for p in cfg.data.path.split(",")] if cfg.data.path else [str(bundled_sft_path())]
    return SFTDataset(
        paths, tokenizer, seq_length=cfg.data.seq_length, pack=cfg.data.pack, overlong=cfg.data.overlong.value,
        empty_think_for_non_thinking=cfg.data.empty_think_for_non_thinking, loss_on=cfg.data.loss_on.value,
        seed=cfg.train.seed,
    )


def microbatch(items: list[dict]) -> dict:
    """Stack samples; packed sequences get their block-causal attention mask."""
    from megatron_ernie.data.sft import block_causal_mask, collate

    batch = collate(items)
    if "doc_ids" in batch:
        batch["attention_mask"] = block_causal_mask(batch["doc_ids"])
    return batch


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])
    return output, partial(masked_token_loss, batch["loss_mask"])


