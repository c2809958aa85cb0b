"""JEE1: SM70 (Llama-2-70B + MedAlpaca QLoRA) on SpassMed's JEE1 medical device.

The installed package maps the repository's three parts under one namespace:
``jee1.convert`` (workstation converter), ``jee1.edge`` (device runtime) and
``jee1.firmware_bridge`` (UI link).  This core package holds what all three share.
"""

__version__ = "0.1.0"
