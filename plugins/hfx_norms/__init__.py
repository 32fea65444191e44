"""First-party normalisation components.

- per token: ``layernorm``, ``rmsnorm``, ``dyt`` (Dynamic Tanh, no statistics);
- over the batch's real tokens: ``batchnorm`` (padding-aware), ``batchnorm_causal`` (training statistics
  at position t from positions <= t only), ``powernorm`` (running quadratic mean, approximate backward).

Each module defines its ``nn.Module`` and ends with ``COMPONENT``, the object its entry point
(group ``hfx.norm``) resolves to.
"""
