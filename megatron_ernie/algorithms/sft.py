"""SFT: batches of packed chat samples, loss = token NLL on assistant tokens only.

Its source is the chat dataset (`data/sft.py`) in static global batches; its loss is
`losses.masked_token_loss`. Packed sequences carry `doc_ids`: attention is made block-causal per
document here (on the local spec, as an explicit mask), positions already restart per document.
"""
from __future__ import annotations

from functools import partial

from megatron_ernie.algorithms.losses import masked_token_loss
from megatron_ernie.training.algorithm import Algorithm


def build_tokenizer(cfg):
    """The run's tokenizer: `data.tokenizer`, else the one of the model we start from (an HF dir,
    or a checkpoint's `hf/` copy), else the demo one."""
    from megatron_ernie.conversion.locate import locate
    from megatron_ernie.data.tokenizer import demo_tokenizer, load_tokenizer

    if cfg.data.tokenizer:
        return load_tokenizer(cfg.data.tokenizer)
    found = locate(cfg.model.init_from).tokenizer if cfg.model.init_from else None
    return load_tokenizer(found) if found is not None else demo_tokenizer()


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


class SFT(Algorithm):
    name = "sft"

    def build_tokenizer(self, cfg):
        return build_tokenizer(cfg)

    def build_dataset(self, cfg, tokenizer):
        return build_dataset(cfg, tokenizer)

    def microbatch(self, items):
        return microbatch(items)

    def forward_step(self, role):
        return forward_step
