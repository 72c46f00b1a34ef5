"""corept plugin for Phi-3 (``phi3``): fused ``qkv_proj`` and ``gate_up_proj`` linears.

Declaring the fused projections is all it takes: the shared MLP splits ``gate_up_proj``'s output
in halves (gate first) around its GLU kernel, LoRA targets default to the four linears the model
has, and ``corept.get_peft_model`` fuses all of them (``lora_mlp`` over ``gate_up_proj`` +
``down_proj``, one ``lora_o`` call each for ``qkv_proj`` and ``o_proj``).
"""
from corept import Architecture, ArchitecturePlugin, ModuleRoles, Projections

PHI3 = Architecture(
    model_type="phi3",
    roles=ModuleRoles.standard("Phi3"),
    projections=Projections.fused(qkv="qkv_proj", gate_up="gate_up_proj"),
    transformers=">=5.17,<6",
)

plugin = ArchitecturePlugin([PHI3])
