"""The medical safety policy: the pre-model screen (text.py reads a message, screen.py applies the
rules of data/safety_rules.toml, model.py the learned model) and the post-model rules (policy.py)."""

from .policy import KINDS, LANGUAGE_RULE, RULES_FILE, Decision, SafetyPolicy
from .text import normalise

__all__ = ["KINDS", "LANGUAGE_RULE", "RULES_FILE", "Decision", "SafetyPolicy", "normalise"]
