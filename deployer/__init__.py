"""rackserve's deployer: plan and serve many LLMs on the GPUs of an on-prem rack.

Importing this package pulls in no Ray, vLLM or torch; those are imported lazily by the
commands that need them, so `rackserve plan` runs on a laptop.
"""

__version__ = "0.1.0"
