"""First-party normalisation components: layernorm, rmsnorm and a padding-aware batchnorm.

Each module defines its ``nn.Module`` and ends with ``COMPONENT``, the object its entry point
(group ``hfx.norm``) resolves to.
"""
