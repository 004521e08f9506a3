"""Does an erasure hold? Probes over the Denoiser protocol.

- :mod:`.attack`: UnlearnDiffAtk-style adversarial prompt attack (``k`` prefix tokens optimised
  so that the erased model denoises the concept's images again, projected to real tokens);
- :mod:`.paraphrase`: the erased concept under other wordings;
- :mod:`.adversarial`: the adversarial self-distillation option of SPARE (forget batches partly
  on the current attack prompt, as AdvUnlearn does);
- :mod:`.text`: differentiable prompt access (token table, prefix encoding) per text stack.
"""
from .attack import AttackConfig, AttackResult, PrefixAttack, attack
from .text import PromptAccess, prompt_access

__all__ = ["AttackConfig", "AttackResult", "PrefixAttack", "attack", "PromptAccess",
           "prompt_access"]
