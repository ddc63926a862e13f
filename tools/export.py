"""
Export a trained model (an SFT or DPO run's out_dir) to a directory in the Hugging Face hub layout:
config.json and model.safetensors, with GPT-2's tokenizer files beside them. transformers then
loads it as any GPT-2, and `hf upload` (huggingface_hub's CLI) publishes the directory as it is.

    python tools/export.py --init_from=out-demo/dpo-beta0.1 --to=hf-dpo
    python -c "from transformers import AutoModelForCausalLM, AutoTokenizer; \\
               m = AutoModelForCausalLM.from_pretrained('hf-dpo'); t = AutoTokenizer.from_pretrained('hf-dpo')"
    hf upload your-name/your-model hf-dpo

The directory also loads back here (`--init_from=hf-dpo` in sample.py, evaluate.py, sft.py, dpo.py).
A LoRA run exports merged, as above, or with --adapter=True as its adapters alone, a peft adapter
directory (adapter_config.json, adapter_model.safetensors) for the base it trained on:

    python tools/export.py --init_from=out-dpo-lora --adapter=True --to=hf-dpo-lora
    python -c "from transformers import GPT2LMHeadModel; from peft import PeftModel; \\
               m = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained('BASE'), 'hf-dpo-lora')"

where BASE is the base in the hub layout (a GPT-2 name, or the SFT run exported as above).
"""

import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project root

from configurator import configure
from data import gpt2_bpe_files
from common import UserError, exit_with_error
from model import EOT_TOKEN, load_model, lora_layers, read_checkpoint, save_pretrained

# -----------------------------------------------------------------------------
init_from = 'out-dpo'  # a run's out_dir (its ckpt.pt), or any model sample.py takes
to = ''  # the directory to write; '' is init_from with '-hf' appended
overwrite = False  # replace a directory already there, whole: no old file survives beside the new
adapter = False  # a LoRA run: write its adapters alone, as a peft adapter directory (not merged)
# -----------------------------------------------------------------------------


def save_tokenizer(save_dir, block_size):
    """GPT-2's tokenizer as transformers reads it: its two BPE files under the names transformers gives
    them (vocab.json, merges.txt), the special token and the longest sequence."""
    vocab_bpe, encoder_json = gpt2_bpe_files()
    shutil.copyfile(encoder_json, os.path.join(save_dir, 'vocab.json'))
    shutil.copyfile(vocab_bpe, os.path.join(save_dir, 'merges.txt'))
    eot = '<|endoftext|>'
    tokenizer_config = dict(tokenizer_class='GPT2Tokenizer', model_max_length=block_size, bos_token=eot,
                            eos_token=eot, unk_token=eot, add_prefix_space=False)
    with open(os.path.join(save_dir, 'tokenizer_config.json'), 'w') as f:
        json.dump(tokenizer_config, f, indent=2)
    with open(os.path.join(save_dir, 'special_tokens_map.json'), 'w') as f:
        json.dump(dict(bos_token=eot, eos_token=eot, unk_token=eot), f, indent=2)
    with open(os.path.join(save_dir, 'generation_config.json'), 'w') as f:
        json.dump(dict(bos_token_id=EOT_TOKEN, eos_token_id=EOT_TOKEN), f, indent=2)


def save_peft_adapter(model, save_dir, config):
    """A LoRA run's adapters as peft writes them for transformers' GPT2LMHeadModel: each layer's
    A and B as lora_A.weight (rank, in) and lora_B.weight (out, rank), the same matrices peft uses
    on GPT-2's Conv1D layers (fan_in_fan_out), and the LoraConfig that rebuilds them."""
    from safetensors.torch import save_file
    tensors = {}
    layers = {id(layer) for layer in lora_layers(model)}
    for name, module in model.named_modules():
        if id(module) in layers:
            for ours, theirs in (('A', 'lora_A'), ('B', 'lora_B')):
                tensors[f"base_model.model.{name}.{theirs}.weight"] = getattr(module.lora, ours).detach().cpu().contiguous()
    os.makedirs(save_dir, exist_ok=True)
    save_file(tensors, os.path.join(save_dir, 'adapter_model.safetensors'), metadata={'format': 'pt'})
    peft_config = dict(peft_type='LORA', task_type='CAUSAL_LM', r=config['lora_rank'],
                       lora_alpha=config['lora_alpha'], lora_dropout=config['lora_dropout'],
                       target_modules=[t.strip() for t in config['lora_targets'].split(',') if t.strip()],
                       fan_in_fan_out=True, bias='none', inference_mode=True,
                       base_model_name_or_path=config['init_from'])
    with open(os.path.join(save_dir, 'adapter_config.json'), 'w') as f:
        json.dump(peft_config, f, indent=2)


def main():
    save_dir = (to or init_from.rstrip('/') + '-hf').rstrip('/')
    if os.path.exists(save_dir) and (not os.path.isdir(save_dir) or os.listdir(save_dir)):
        if not overwrite:
            raise UserError(f"{save_dir} already exists and is not an empty directory: choose another "
                            "--to, or replace it whole with --overwrite=True")
        if os.path.realpath(save_dir) == os.path.realpath(init_from):
            raise UserError(f"--to={save_dir} is the model being exported: choose another --to")
    if adapter:  # the run's own adapters, not merged: its checkpoint as a resume reads it
        path = os.path.join(init_from, 'ckpt.pt')
        run = read_checkpoint(path) if os.path.isfile(path) else {}
        if not run.get('config', {}).get('lora_rank'):
            raise UserError(f"--adapter=True exports a LoRA run's adapters, and {init_from} is not a "
                            "LoRA run (no lora_rank in its ckpt.pt): export it merged, without --adapter")
        model = load_model('resume', out_dir=init_from, checkpoint=run)
    else:
        model = load_model(init_from)
    # written whole into a directory of its own beside save_dir, then swapped in: a failure leaves the
    # old export as it was, and no file of the old one survives beside the new
    staging = f"{save_dir}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        if adapter:
            save_peft_adapter(model, staging, run['config'])
        else:
            save_pretrained(model, staging)
        save_tokenizer(staging, model.config.block_size)
        old = f"{save_dir}.{os.getpid()}.old"
        if os.path.lexists(save_dir):
            os.rename(save_dir, old)
        os.rename(staging, save_dir)
        if os.path.isdir(old):
            shutil.rmtree(old)
        elif os.path.lexists(old):  # a file where the directory was to go
            os.remove(old)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {save_dir}: {', '.join(sorted(os.listdir(save_dir)))}")


if __name__ == '__main__':
    configure(globals())
    try:
        main()
    except (UserError, ValueError, OSError) as e:
        exit_with_error(e)
