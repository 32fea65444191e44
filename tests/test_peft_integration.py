"""PEFT learns the hfx LoRA targets without `import hfx` importing PEFT."""

import subprocess
import sys

SCRIPT = """
import sys
import hfx
assert "peft" not in sys.modules, "import hfx must not import peft"
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
config = hfx.HfxConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
model = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(task_type="CAUSAL_LM"))
wrapped = sorted({name.split(".")[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")})
print(",".join(wrapped))
"""


def test_lora_config_without_target_modules_works_for_hfx_after_plain_import():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "down_proj,k_proj,o_proj,q_proj,up_proj,v_proj"
