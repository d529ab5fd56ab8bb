"""Imports every module that registers a reward source type (their `@register_source` runs)."""
from megatron_ernie.rewards import checklist, judges, math_verify, reward_model, sandbox, verifiers

MODULES = (checklist, judges, math_verify, reward_model, sandbox, verifiers)
